"""Baselines that answer the same queries as reir over the same stored instances.

All of them start from what ingestion stores for every gallery image (up to K instances:
pixel box ``[x, y, w, h]``, objectness, L2-normalized embedding; the image's size), and all
ground an expression inside an image with the best scorer the project has: the relation-aware
re-ranker over that image's stored instances (``ground``, see :data:`GroundFn`). They differ
from reir in which images reach it:

- **two-stage** (retrieve images, then ground the expression in each): images are ranked by
  an image-level retriever (one global vector per image, computed at ingestion, scored
  against the expression: ``reir.model.image_retrieval``); the re-ranker picks the box inside
  each of the top images. One (image, box) per image, in image-retrieval order, or
  (``rescore``) a wider pool of retrieved images ordered by the re-ranker's best instance.
- **re-rank scan** (exhaustive): the re-ranker scores every instance of every gallery image;
  images are ranked by their best instance. Exact: the upper bound of reir's pool (ANN top
  candidates, then the re-ranker on their images), at a cost that grows with the gallery.

reir's own ranking (ANN + re-ranker) is the Serve app's query path
(``reir.evaluation.comparison``); this module is the ranking logic alone, numpy in and out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reir.evaluation.metrics import Prediction, box_recall_at_k, br_key

# image rows [n] of the gallery -> re-ranked logits [n, M] of their instances (slot j = the
# image's j-th stored instance; -inf past its last one); higher is better.
GroundFn = Callable[[np.ndarray], np.ndarray]

BASELINE_KS = (1, 5, 10)
# Images per re-ranker call of the exhaustive scan: its fastest on 2 cores, one thread, 10k images
# (2026-11-29): the plain scan 539-551 ms at 256-2048, the cached one 251 ms at 512 against 318
# at 2048 (its padded [images, 16, 16, ...] pair tensors fall out of cache) and 504 in one call.
SCAN_CHUNK = 512
BASELINE_TAU = 0.5


@dataclass(frozen=True)
class InstanceGallery:
    """Every gallery image's stored instances, flattened for vectorized scoring.

    Attributes:
        image_ids: ``[N]`` images that have at least one instance, sorted.
        boxes: ``[M, 4]`` float pixel ``[x, y, w, h]`` of all instances, grouped by image.
        embeddings: ``[M, D]`` float32 L2-normalized instance embeddings, same order.
        scores: ``[M]`` float objectness of each instance (what the re-ranker reads).
        starts: ``[N]`` index of each image's first instance in ``boxes``/``embeddings``.
        image_sizes: ``[N, 2]`` float (width, height) of each image in pixels.
    """

    image_ids: tuple[str, ...]
    boxes: np.ndarray
    embeddings: np.ndarray
    scores: np.ndarray
    starts: np.ndarray
    image_sizes: np.ndarray

    @classmethod
    def from_instances(
        cls, instances: Mapping[str, Sequence[tuple[Any, ...]]],
        image_sizes: Mapping[str, tuple[float, float]] | None = None,
    ) -> InstanceGallery:
        """``{image_id: [(box_xywh, embedding[, objectness]), ...]}``; images without instances
        are left out. Objectness defaults to 1; an image's size to its instances' extent."""
        ids = sorted(i for i, rows in instances.items() if rows)
        if not ids:
            raise ValueError("the gallery has no instances")
        boxes: list[list[float]] = []
        embs: list[np.ndarray] = []
        scores: list[float] = []
        starts: list[int] = []
        sizes: list[tuple[float, float]] = []
        for image_id in ids:
            starts.append(len(boxes))
            for row in instances[image_id]:
                box = row[0]
                if len(box) != 4:
                    raise ValueError(f"image {image_id!r}: box {list(box)} is not [x, y, w, h]")
                boxes.append([float(v) for v in box])
                embs.append(np.asarray(row[1], dtype=np.float32).reshape(-1))
                scores.append(float(row[2]) if len(row) > 2 else 1.0)
            own = np.asarray(boxes[starts[-1]:])
            extent = (float((own[:, 0] + own[:, 2]).max()), float((own[:, 1] + own[:, 3]).max()))
            if image_sizes and image_id in image_sizes:
                width, height = image_sizes[image_id]
                extent = (float(width), float(height))
            sizes.append(extent)
        dims = {e.shape[0] for e in embs}
        if len(dims) != 1:
            raise ValueError(f"instance embeddings have different sizes: {sorted(dims)}")
        return cls(tuple(ids), np.asarray(boxes, dtype=np.float64), np.stack(embs), np.asarray(scores),
                   np.asarray(starts), np.asarray(sizes, dtype=np.float64))  # fmt: skip

    @property
    def sizes(self) -> np.ndarray:
        """``[N]`` instances per image."""
        return np.diff(np.append(self.starts, len(self.boxes)))


def _order(scores: np.ndarray, ids: Sequence[str]) -> list[int]:
    """Indices best first; ties broken by image id so rankings are deterministic."""
    return sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))


def _grounded(gallery: InstanceGallery, rows: Sequence[int], ground: GroundFn) -> tuple[np.ndarray, np.ndarray]:
    """The re-ranker's best logit ``[n]`` and best instance (flat index into ``boxes``) ``[n]``
    in each of the images ``rows``."""
    index = np.asarray(rows, dtype=np.int64)
    logits = np.asarray(ground(index), dtype=np.float64).reshape(len(index), -1)
    sizes = gallery.sizes[index]
    if logits.shape[1] < int(sizes.max(initial=0)):
        raise ValueError(f"ground returned {logits.shape[1]} logits per image for up to {sizes.max()} instances")
    slots = np.arange(logits.shape[1])[None, :]
    logits = np.where(slots < sizes[:, None], logits, -np.inf)
    best = logits.argmax(axis=1)
    return logits[np.arange(len(index)), best], gallery.starts[index] + best


def two_stage_rank(
    image_scores: np.ndarray, gallery: InstanceGallery, ground: GroundFn, top_k: int, *, rescore: int = 0
) -> list[Prediction]:
    """Images by the retriever's ``image_scores [N]``, the re-ranker's box in each.

    ``rescore == 0``: the ``top_k`` best images in retrieval order (the classic two-stage
    system). ``rescore > 0``: the ``rescore`` best images, ordered by their best re-ranked
    instance (reir's re-rank pool filled by image retrieval instead of instance ANN)."""
    if len(image_scores) != len(gallery.image_ids):
        raise ValueError(f"{len(image_scores)} image scores for {len(gallery.image_ids)} images")
    pool = _order(np.asarray(image_scores), gallery.image_ids)[: max(top_k, rescore)]
    best, inst = _grounded(gallery, pool, ground)
    if rescore:
        keep = _order(best, [gallery.image_ids[i] for i in pool])[:top_k]
        return [Prediction(gallery.image_ids[pool[k]], tuple(gallery.boxes[inst[k]]), float(best[k])) for k in keep]
    return [Prediction(gallery.image_ids[i], tuple(gallery.boxes[j]), float(image_scores[i]))
            for i, j in zip(pool[:top_k], inst[:top_k])]  # fmt: skip


def rerank_scan_rank(gallery: InstanceGallery, ground: GroundFn, top_k: int, *,
                     chunk: int = SCAN_CHUNK) -> list[Prediction]:  # fmt: skip
    """The re-ranker on every image (``chunk`` images per call); images ranked by their best
    instance's re-ranked logit."""
    n = len(gallery.image_ids)
    best, inst = np.empty(n), np.empty(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        best[lo : lo + chunk], inst[lo : lo + chunk] = _grounded(gallery, range(lo, min(n, lo + chunk)), ground)
    return [Prediction(gallery.image_ids[i], tuple(gallery.boxes[inst[i]]), float(best[i]))
            for i in _order(best, gallery.image_ids)[:top_k]]  # fmt: skip


def system_summary(
    predictions: Mapping[str, Sequence[Prediction]],
    ground_truth: Mapping[str, Any],
    seconds: float,
    *,
    ks: Sequence[int] = BASELINE_KS,
    tau: float = BASELINE_TAU,
) -> dict[str, float]:
    """``{"BR@1@0.5": ..., "BR@5@0.5": ..., "BR@10@0.5": ..., "seconds_per_query", "num_queries"}``.

    ``seconds`` is the wall time of answering all of ``ground_truth``'s queries.
    """
    metrics = box_recall_at_k(predictions, ground_truth, ks=ks, taus=(tau,))
    n = len(ground_truth)
    return {**metrics, "seconds_per_query": seconds / n, "num_queries": n}


def comparison_table(systems: Mapping[str, Mapping[str, float]], *, ks: Sequence[int] = BASELINE_KS,
                     tau: float = BASELINE_TAU) -> str:  # fmt: skip
    """Markdown table: one row per system, BR@k (%) at ``tau`` and milliseconds per query."""
    head = "| system | " + " | ".join(f"BR@{k} (IoU>={tau:g})" for k in ks) + " | ms / query | queries |"
    lines = [head, "|" + "---|" * (len(ks) + 3)]
    for name, m in systems.items():
        cells = " | ".join(f"{100 * m[br_key(k, tau)]:.1f}" for k in ks)
        lines.append(f"| {name} | {cells} | {1000 * m['seconds_per_query']:.2f} | {int(m['num_queries'])} |")
    return "\n".join(lines)
