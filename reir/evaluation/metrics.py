"""Retrieval metrics for REIR: box recall over the gallery, REC accuracy, discovery.

``BR@k@tau`` (box recall) is strict: a query is a hit at ``k`` iff one of its top-``k``
(image, box) predictions is in a ground-truth image AND overlaps that image's ground-truth
box with IoU >= ``tau``. Right box in the wrong image, or right image with a loose
box, are both misses. Values are fractions in [0, 1].

A query may have several acceptable targets (every instance its expression describes, in
one or several images: ``reir.data.Query.targets``); a prediction that hits any of them
counts. Ground truth is given per query as an ``(image_id, box)`` pair, a sequence of such
pairs (the first is the query's own image), or an object with ``ground_truth`` (every
target) or ``image_id`` / ``box`` (one).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reir.model.boxes import iou_xywh

# IoU is computed in floating point; without a little slack a box that overlaps
# exactly tau (e.g. half of the GT) could land at 0.4999999 and count as a miss.
IOU_EPS = 1e-9


@dataclass(frozen=True)
class Prediction:
    image_id: str
    box: Sequence[float]  # [x, y, w, h] pixels
    score: float = 0.0


class _HasImageBox(Protocol):
    @property
    def image_id(self) -> str: ...

    @property
    def box(self) -> Sequence[float]: ...


Pair = tuple[str, Sequence[float]]
GroundTruth = Pair | Sequence[Pair] | _HasImageBox


def _gt(value: Pair | _HasImageBox) -> Pair:
    """Accept (image_id, box) pairs or objects with .image_id/.box (e.g. reir.data.Query)."""
    if isinstance(value, tuple):
        return str(value[0]), value[1]
    return str(value.image_id), value.box


def _truth(value: GroundTruth) -> tuple[str, list[Pair]]:
    """(the query's own image, every acceptable (image_id, box)) of one ground truth."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], str):
        pair = _gt(tuple(value))  # type: ignore[arg-type]
        return pair[0], [pair]
    if isinstance(value, (tuple, list)):
        pairs = [_gt(tuple(p)) for p in value]
        if not pairs:
            raise ValueError("a ground truth with no (image_id, box) target")
        return pairs[0][0], pairs
    own = _gt(value)  # type: ignore[arg-type]  # not a sequence: an object with image_id / box
    targets = getattr(value, "ground_truth", None)
    return own[0], [_gt(t) for t in targets] if targets else [own]


def _pred(value: Prediction | tuple[str, Sequence[float]]) -> tuple[str, Sequence[float]]:
    if isinstance(value, tuple):
        return str(value[0]), value[1]
    return str(value.image_id), value.box


def _check_ids(predictions: Mapping[str, Any], ground_truth: Mapping[str, Any]) -> None:
    if not ground_truth:
        raise ValueError("ground_truth is empty: no queries to evaluate")
    unknown = [q for q in predictions if q not in ground_truth]
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} unknown query ids, e.g. {unknown[:3]}")


def _hits(image_id: str, box: Sequence[float], targets: Sequence[Pair], tau: float) -> bool:
    return any(image_id == t_image and iou_xywh(box, t_box) >= tau - IOU_EPS for t_image, t_box in targets)


def is_hit(image_id: str, box: Sequence[float], ground_truth: GroundTruth, tau: float = 0.5) -> bool:
    """Whether one (image, box) answer hits any target of ``ground_truth`` at IoU >= ``tau``."""
    return _hits(image_id, box, _truth(ground_truth)[1], tau)


def _first_hit_rank(preds: Sequence[Any], targets: Sequence[Pair], tau: float) -> float:
    """0-based rank of the first prediction that hits any target, or inf if none."""
    for rank, p in enumerate(preds):
        if _hits(*_pred(p), targets, tau):
            return rank
    return math.inf


def br_key(k: int, tau: float) -> str:
    return f"BR@{k}@{tau:g}"


def box_recall_at_k(
    predictions: Mapping[str, Sequence[Prediction | tuple[str, Sequence[float]]]],
    ground_truth: Mapping[str, GroundTruth],
    ks: Iterable[int] = (1, 5, 10),
    taus: Iterable[float] = (0.5, 0.7, 0.9),
) -> dict[str, float]:
    """``{"BR@{k}@{tau}": recall}`` over every ground-truth query (missing = miss); a
    prediction hitting any of a query's targets counts."""
    ks, taus = list(ks), list(taus)
    _check_ids(predictions, ground_truth)
    hits = {(k, t): 0 for k in ks for t in taus}
    for qid, gt in ground_truth.items():
        targets = _truth(gt)[1]
        preds = predictions.get(qid, [])
        for t in taus:
            rank = _first_hit_rank(preds[: max(ks)], targets, t)
            for k in ks:
                hits[(k, t)] += rank < k
    n = len(ground_truth)
    return {br_key(k, t): hits[(k, t)] / n for k in ks for t in taus}


def rec_accuracy(
    top_instances: Mapping[str, Sequence[float] | None],
    ground_truth: Mapping[str, GroundTruth],
    taus: Iterable[float] = (0.5, 0.7, 0.9),
) -> dict[str, float]:
    """REC: the single best box predicted *inside the query's own image* per query, a hit when
    it overlaps any target box of that image (missing = miss)."""
    taus = list(taus)
    _check_ids(top_instances, ground_truth)
    hits = dict.fromkeys(taus, 0)
    for qid, gt in ground_truth.items():
        box = top_instances.get(qid)
        if box is None:
            continue
        own, targets = _truth(gt)
        for t in taus:
            hits[t] += _hits(own, box, targets, t)
    return {f"REC_Acc@{t:g}": hits[t] / len(ground_truth) for t in taus}


def discovery_scores(
    predictions: Mapping[str, Sequence[Prediction | tuple[str, Sequence[float]]]],
    ground_truth: Mapping[str, Sequence[tuple[str, Sequence[float]]]],
    tau: float = 0.5,
) -> dict[str, float]:
    """Micro precision/recall/F1 of instance discovery (queries with 0..n matches).

    Predictions are matched greedily in rank order, each GT instance at most once, to
    a GT box of the same image with IoU >= tau; every prediction for a query with no
    matches is a false positive."""
    _check_ids(predictions, ground_truth)
    tp = n_pred = n_gt = 0
    for qid, gts in ground_truth.items():
        free = [(_gt(g)) for g in gts]
        n_gt += len(free)
        for p in predictions.get(qid, []):
            n_pred += 1
            image_id, box = _pred(p)
            for j, (g_img, g_box) in enumerate(free):
                if g_img == image_id and iou_xywh(box, g_box) >= tau - IOU_EPS:
                    tp += 1
                    free.pop(j)
                    break
    precision = tp / n_pred if n_pred else 1.0
    recall = tp / n_gt if n_gt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    t = f"{tau:g}"
    return {f"Disc_P@{t}": precision, f"Disc_R@{t}": recall, f"Disc_F1@{t}": f1}


_BR = re.compile(r"^BR@(\d+)@([0-9.]+)$")


def format_table(metrics: Mapping[str, float]) -> str:
    """Box recall as a k x tau grid (percent), then any other metrics one per line."""
    grid: dict[int, dict[str, float]] = {}
    rest: list[tuple[str, float]] = []
    for key, value in metrics.items():
        m = _BR.match(key)
        if m:
            grid.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            rest.append((key, value))
    lines = []
    if grid:
        taus = sorted({t for row in grid.values() for t in row}, key=float)
        lines.append("BR (%)  " + "".join(f"{'IoU>=' + t:>11}" for t in taus))
        for k in sorted(grid):
            cells = "".join(f"{100 * grid[k][t]:>11.1f}" if t in grid[k] else f"{'-':>11}" for t in taus)
            lines.append(f"R@{k:<6}" + cells)
    width = max((len(k) for k, _ in rest), default=0)
    for key, value in rest:
        shown = f"{100 * value:.1f}%" if isinstance(value, float) and 0.0 <= value <= 1.0 else f"{value}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def write_metrics_json(path: str | Path, metrics: Mapping[str, float], **extra: Any) -> None:
    """One flat object: ``{"BR@1@0.5": ..., "REC_Acc@0.5": ..., **extra}`` (e.g. num_queries,
    wall_seconds), the shape `reir eval --out` and `reir demo --out` both promise."""
    clash = set(metrics) & set(extra)
    if clash:
        raise ValueError(f"extra fields would overwrite metrics: {sorted(clash)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**dict(metrics), **extra}, indent=2, sort_keys=True) + "\n")
