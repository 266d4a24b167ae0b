"""Discovery-mode scoring: every image that holds the described object, or none.

A discovery query has a set of ground-truth matches (image, box), possibly empty. The
service answers with one (image, box, probability) per image whose best candidate reaches
the presence threshold. The metric joins retrieval recall and localization precision:

* an answer is **correct** when its image holds a match and its box overlaps that match's
  box by IoU >= ``tau`` (a right image with a wrong box counts against precision);
* **precision** = correct answers / answers, **recall** = ground-truth images found by a
  correct answer / ground-truth images (both summed over queries: micro averages);
* **F1** of the two, and **none accuracy**: the share of queries with no match that were
  answered with nothing.

Answers are collected once with every candidate kept (threshold 0), then scored at each
threshold: that gives the precision/recall curve and the figures at the calibrated one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reir.data.records import DiscoveryQuery
from reir.model.boxes import iou_xywh

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Found:
    """One answer of a discovery query: an image, its best box and the presence probability."""

    image_id: str
    box: Box
    prob: float


def _truth(query: DiscoveryQuery) -> dict[str, list[Box]]:
    by_image: dict[str, list[Box]] = {}
    for m in query.matches:
        if m.bbox is None:
            raise ValueError(f"discovery query {query.query_id}: match {m.ann_id} has no bbox")
        by_image.setdefault(str(m.image_id), []).append(tuple(float(v) for v in m.bbox))  # type: ignore[arg-type]
    return by_image


def discovery_scores(
    answers: Mapping[str, Sequence[Found]], queries: Sequence[DiscoveryQuery], threshold: float, *, tau: float = 0.5
) -> dict[str, float]:
    """Precision, recall, F1 and none-accuracy of ``answers`` kept at ``prob >= threshold``."""
    answered = correct = truth_images = found_images = 0
    empty = empty_ok = 0
    for q in queries:
        truth = _truth(q)
        kept = [a for a in answers.get(q.query_id, ()) if a.prob >= threshold]
        answered += len(kept)
        truth_images += len(truth)
        hits = {a.image_id for a in kept if any(iou_xywh(a.box, b) >= tau for b in truth.get(a.image_id, ()))}
        correct += sum(1 for a in kept if a.image_id in hits)
        found_images += len(hits)
        if not truth:
            empty += 1
            empty_ok += not kept
    precision = correct / answered if answered else 1.0
    recall = found_images / truth_images if truth_images else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "none_accuracy": empty_ok / empty if empty else 1.0, "answers": float(answered)}  # fmt: skip


def discovery_curve(
    answers: Mapping[str, Sequence[Found]], queries: Sequence[DiscoveryQuery], *, tau: float = 0.5,
    points: int = 101,
) -> list[dict[str, float]]:
    """:func:`discovery_scores` at ``points`` thresholds spread over the answers' probabilities."""
    probs = sorted({a.prob for found in answers.values() for a in found})
    if not probs:
        return [discovery_scores(answers, queries, 0.5, tau=tau)]
    qs = np.unique(np.quantile(np.asarray(probs), np.linspace(0.0, 1.0, points)))
    return [discovery_scores(answers, queries, float(t), tau=tau) for t in qs]


def plot_curve(curve: Sequence[Mapping[str, float]], at: Mapping[str, float], path: Path, *, title: str) -> Path:
    """Precision/recall curve with the calibrated operating point marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot([c["recall"] for c in curve], [c["precision"] for c in curve], lw=1.5, label="threshold sweep")
    ax.scatter([at["recall"]], [at["precision"]], color="red", zorder=3,
               label=f"calibrated threshold {at['threshold']:.3f} (F1 {at['f1']:.2f})")
    ax.set_xlabel("recall (ground-truth images found with IoU >= 0.5)")
    ax.set_ylabel("precision (answers with the right box)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(curve: Sequence[Mapping[str, float]], at: Mapping[str, float], queries: Sequence[Any]) -> dict[str, Any]:
    best = max(curve, key=lambda c: c["f1"])
    return {"at_calibrated_threshold": dict(at), "best_f1_on_curve": dict(best), "num_queries": len(queries),
            "empty_queries": sum(1 for q in queries if not q.matches), "curve": [dict(c) for c in curve]}
