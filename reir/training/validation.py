"""Evaluation during training: BR@k and REC accuracy on a small, fixed held-out set, and
the loss and metric curves of a run as a PNG.

The held-out set is the benchmark's test split, capped (``eval_max_queries`` queries,
``eval_max_images`` gallery images) so that an evaluation costs seconds, not minutes; it
is the same set at every evaluation, so the curve shows the model changing, not the
sample. The gallery is searched exhaustively in memory (every kept instance of every
held-out image, as ingestion stores them): a training signal on the same metrics as
``reir eval``, not the benchmark number (no ANN, no serving-side near-duplicate dedupe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reir.data.formats import Query, load_samples, test_queries
from reir.evaluation.metrics import Prediction, box_recall_at_k, rec_accuracy
from reir.evaluation.runner import KS, TAUS

EVAL_PREFIX = "eval_"
INSTANCES_PER_IMAGE = 10  # what ingestion stores per image by default
CURVE_METRICS = ("BR@1@0.5", "BR@5@0.5", "BR@10@0.5", "REC_Acc@0.5")


@dataclass(frozen=True)
class HeldOutSet:
    """Queries and the gallery they are searched in; every query's image is in the gallery."""

    queries: list[Query]
    image_ids: list[str]
    images: list[Image.Image]

    @classmethod
    def load(cls, data_root: str | Path, *, max_queries: int, max_images: int) -> HeldOutSet:
        """The first ``max_queries`` test queries whose image fits in ``max_images`` gallery
        images (the queries' images first, then other test images as distractors)."""
        queries = test_queries(data_root)
        if not queries:
            raise ValueError(f"{Path(data_root) / 'reircoco.json'}: no test-split queries to evaluate on "
                             "(eval_every needs a held-out split)")
        kept: list[Query] = []
        image_ids: list[str] = []
        paths: dict[str, str] = {}
        for q in queries:
            if len(kept) >= max_queries:
                break
            if q.image_id not in paths:
                if len(image_ids) >= max_images:
                    continue
                image_ids.append(q.image_id)
                paths[q.image_id] = q.path
            kept.append(q)
        for s in load_samples(data_root, "test"):
            if len(image_ids) >= max_images:
                break
            if s.image_id not in paths:
                image_ids.append(s.image_id)
                paths[s.image_id] = s.path
        images = [_load_rgb(paths[i]) for i in image_ids]
        return cls(queries=kept, image_ids=image_ids, images=images)


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as f:
        return f.convert("RGB")


@torch.no_grad()
def evaluate_held_out(model: Any, processor: Any, held: HeldOutSet, *, batch_images: int = 32) -> dict[str, float]:
    """``{"BR@k@tau": ..., "REC_Acc@tau": ...}`` of ``model`` on ``held`` (restores train mode)."""
    was_training = bool(model.training)
    model.eval()
    try:
        inst_image, inst_box, inst_emb = _encode_gallery(model, processor, held, batch_images)
        text = _encode_queries(model, processor, held.queries)
    finally:
        model.train(was_training)
    truth = {q.query_id: q for q in held.queries}
    if not inst_image:  # an untrained detector may keep nothing: every query misses
        return {**box_recall_at_k({}, truth, KS, TAUS), **rec_accuracy({}, truth, TAUS)}
    scores = model.score(text, inst_emb.to(text.dtype)).float().cpu()  # [T, N]
    owner = np.asarray(inst_image)
    predictions: dict[str, list[Prediction]] = {}
    top_boxes: dict[str, list[float] | None] = {}
    for row, q in enumerate(held.queries):
        order = torch.argsort(scores[row], descending=True)[: max(KS)].tolist()
        predictions[q.query_id] = [Prediction(inst_image[i], inst_box[i], float(scores[row, i])) for i in order]
        own = np.flatnonzero(owner == q.image_id)
        top_boxes[q.query_id] = inst_box[int(own[int(scores[row, own].argmax())])] if own.size else None
    return {**box_recall_at_k(predictions, truth, KS, TAUS), **rec_accuracy(top_boxes, truth, TAUS)}


def _encode_gallery(
    model: Any, processor: Any, held: HeldOutSet, batch_images: int
) -> tuple[list[str], list[list[float]], torch.Tensor]:
    device, dtype = model.device, next(model.parameters()).dtype
    owners: list[str] = []
    boxes: list[list[float]] = []
    embs: list[np.ndarray] = []
    for start in range(0, len(held.images), batch_images):
        images = held.images[start : start + batch_images]
        out = model.encode_images(processor.images(images).to(device=device, dtype=dtype))
        per_image = processor.postprocess(out, sizes=[im.size for im in images], top_k=INSTANCES_PER_IMAGE)
        for image_id, insts in zip(held.image_ids[start : start + batch_images], per_image):
            owners += [image_id] * len(insts)
            boxes += [list(i.box_xywh) for i in insts]
            embs += [i.embedding for i in insts]
    stacked = torch.from_numpy(np.stack(embs)) if embs else torch.zeros(0, 1)
    return owners, boxes, stacked.to(device)


def _encode_queries(model: Any, processor: Any, queries: Sequence[Query]) -> torch.Tensor:
    chunks = []
    for start in range(0, len(queries), 256):
        enc = processor.text([q.text for q in queries[start : start + 256]])
        chunks.append(model.encode_text(**{k: v.to(model.device) for k, v in enc.items()}).embeddings)
    return torch.cat(chunks)


def prefixed(metrics: Mapping[str, float]) -> dict[str, float]:
    """Held-out metrics as they appear in reports and the history (``eval_BR@1@0.5``)."""
    return {f"{EVAL_PREFIX}{k}": float(v) for k, v in metrics.items()}


def plot_curves(history: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Loss curves (left) and held-out metric curves (right) against the optimizer step.

    ``history["train"]``: records ``{"step", "loss", "loss_*"...}``; ``history["eval"]``:
    records ``{"step", "eval_BR@1@0.5", ...}`` (either may be empty)."""
    # The Agg canvas directly: no pyplot, so no global backend switch in the worker.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    train = list(history.get("train", []))
    keys = sorted({k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    for key in keys:
        pts = [(r["step"], r[key]) for r in train if key in r]
        loss_ax.plot(*zip(*pts), label=key, linewidth=2.0 if key == "loss" else 1.0)
    loss_ax.set(title="training loss (rank 0)", xlabel="step", ylabel="loss")
    evals = list(history.get("eval", []))
    for name in CURVE_METRICS:
        pts = [(r["step"], r[EVAL_PREFIX + name]) for r in evals if EVAL_PREFIX + name in r]
        if pts:
            metric_ax.plot(*zip(*pts), marker="o", label=name)
    metric_ax.set(title="held-out metrics", xlabel="step", ylabel="fraction", ylim=(-0.02, 1.02))
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
