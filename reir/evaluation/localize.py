"""BR@k on small objects, with and without the localize stage's zoom.

A query is a *small-object* query when its ground-truth box covers less than
``small_area_fraction`` of its image (the same threshold the localize stage uses to
decide whether to zoom). For those queries the same ranked answers are scored twice:
with the stored boxes (what the service answers with the stage off) and after the
stage's refiner rewrote the boxes of the top ``k`` answers (what it answers with the
stage on and ``max_results >= k``). Ranking is unchanged by the stage, so any
difference in BR@k comes from the boxes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from reir.data.formats import Query
from reir.evaluation.metrics import Prediction, box_recall_at_k

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Answer:
    """One ranked answer as the service returns it: the image, where to read it, the box."""

    image_id: str
    uri: str
    box: Box


class BoxUpdateLike(Protocol):
    box: Sequence[float]
    refined: bool


# (query text, [(uri, box)]) -> one update per box (``reir.serving.localize.Localizer.localize``)
Refiner = Callable[[str, list[tuple[str, Box]]], Sequence[BoxUpdateLike]]


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:  # the header only
        return img.size


def small_object_queries(
    queries: Sequence[Query], small_area_fraction: float, *, size_of: Callable[[str], tuple[int, int]] = _image_size
) -> list[Query]:
    """The queries whose ground-truth box covers less than ``small_area_fraction`` of the image."""
    if not 0.0 < small_area_fraction <= 1.0:
        raise ValueError(f"small_area_fraction must be in (0, 1], got {small_area_fraction}")
    small = []
    for q in queries:
        if not q.path:
            raise ValueError(f"query {q.query_id} has no image path: cannot tell whether its object is small")
        width, height = size_of(q.path)
        if q.box[2] * q.box[3] < small_area_fraction * width * height:
            small.append(q)
    return small


def zoom_box_recall(
    answers: Mapping[str, Sequence[Answer]],
    queries: Sequence[Query],
    refine: Refiner,
    *,
    ks: Sequence[int] = (1, 5, 10),
    taus: Sequence[float] = (0.5, 0.7, 0.9),
) -> dict[str, Any]:
    """``BR@k@tau`` of ``answers`` as stored and ``zoom_BR@k@tau`` after ``refine``.

    ``answers`` maps a query id to its ranked answers (at least ``max(ks)`` are refined);
    also reports how many answers the refiner changed (``refined_answers``) and
    ``num_queries``.
    """
    texts = {q.query_id: q.text for q in queries}
    truth = {q.query_id: q for q in queries}
    unknown = sorted(set(answers) - set(texts))
    if unknown:
        raise ValueError(f"answers for {len(unknown)} unknown query ids, e.g. {unknown[:3]}")
    top = max(ks)
    stored: dict[str, list[Prediction]] = {}
    zoomed: dict[str, list[Prediction]] = {}
    refined = 0
    for qid, ranked in answers.items():
        head = list(ranked[:top])
        updates = list(refine(texts[qid], [(a.uri, a.box) for a in head])) if head else []
        if len(updates) != len(head):
            raise ValueError(f"refiner answered {len(updates)} boxes for {len(head)} (query {qid})")
        stored[qid] = [Prediction(a.image_id, a.box) for a in head]
        zoomed[qid] = [Prediction(a.image_id, tuple(u.box)) for a, u in zip(head, updates, strict=True)]
        refined += sum(bool(u.refined) for u in updates)
    metrics: dict[str, Any] = dict(box_recall_at_k(stored, truth, ks=ks, taus=taus))
    metrics.update({f"zoom_{k}": v for k, v in box_recall_at_k(zoomed, truth, ks=ks, taus=taus).items()})
    metrics["refined_answers"] = refined
    metrics["num_queries"] = len(truth)
    return metrics
