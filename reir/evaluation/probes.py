"""Linear probes: can a linear classifier read an attribute from a set of features?

Diagnostics of what a checkpoint's embeddings carry (``bench/probe.py``,
``bench/diagnose.py``): a softmax layer on standardized features, trained full batch with
Adam, scored on examples it did not see. An accuracy near the most frequent label's share
means the attribute is not (linearly) there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                   num_classes: int, steps: int = 500, seed: int = 0) -> float:  # fmt: skip
    """Test accuracy of a linear classifier fit on ``x_train [N, D]`` / ``y_train [N]`` long;
    both sets are standardized by the training set's mean and spread."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    torch.manual_seed(seed)
    head = torch.nn.Linear(x_train.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x_test).argmax(1) == y_test).float().mean())


def split_probe(features: list[np.ndarray], labels: list[str], *, steps: int = 500, seed: int = 0,
                train_fraction: float = 0.7) -> dict[str, Any]:  # fmt: skip
    """Fit on a seeded ``train_fraction`` of (feature, label) pairs, score on the rest.

    Returns ``{"accuracy", "majority"`` (the most frequent label's share of the scored part),
    ``"n", "classes"}``; accuracy and majority are None below 10 examples."""
    names = sorted(set(labels))
    if len(labels) < 10:
        return {"accuracy": None, "majority": None, "n": len(labels), "classes": len(names)}
    x = torch.tensor(np.stack(features), dtype=torch.float32)
    y = torch.tensor([names.index(v) for v in labels])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * len(y))
    train, test = perm[:cut], perm[cut:]
    acc = probe_accuracy(x[train], y[train], x[test], y[test], num_classes=len(names), steps=steps, seed=seed)
    majority = float(np.bincount(y[test].numpy(), minlength=len(names)).max()) / max(len(test), 1)
    return {"accuracy": round(acc, 4), "majority": round(majority, 4), "n": len(y), "classes": len(names)}
