"""Learning sanity check: the tiny preset must learn detection + REC on synthetic scenes.

Deterministic (seeded, fixed thread count) and well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import torch

from reir.model import create_model

from .synthetic import make_dataset
from .train_utils import evaluate, train, use_training_threads


def test_tiny_learns_detection_and_rec() -> None:
    use_training_threads()
    torch.manual_seed(0)
    train_data = make_dataset(0, 400)
    test_data = make_dataset(1, 80, start=10_000)  # held-out scenes, 2-4 shapes each
    model, proc = create_model("tiny")
    before = evaluate(model, proc, test_data)
    losses = train(model, proc, train_data, steps=100, batch_size=16, lr=1e-3, seed=0)
    after = evaluate(model, proc, test_data)
    print(f"before={before}\nafter={after}\nloss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]
    # Chance for REC is ~1/3 (2-4 shapes per image) even with perfect boxes.
    assert after.det_top1_precision > 0.8, after
    assert after.det_recall > 0.8, after
    assert after.rec_acc > 0.6, after
    assert after.rec_acc > before.rec_acc + 0.4, (before, after)
