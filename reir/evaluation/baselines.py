"""Baselines that answer the same queries as reir over the same stored instances.

Both start from what ingestion stores for every gallery image (up to K instances: pixel box
``[x, y, w, h]`` + L2-normalized embedding), so they differ from reir only in how they rank:

- **two-stage** (image retrieval, then REC): images are ranked by the similarity of the text
  embedding to a pooled image embedding (the mean of the image's instance embeddings,
  re-normalized); inside each of the top images, REC picks the instance the model scores
  highest for the expression. One (image, box) per image, in image-retrieval order.
- **REC scan** (exhaustive): REC runs on every gallery image; images are ranked by the score
  of their REC box. Exact, and its cost grows with the gallery.

"REC" here is the model's own referring step (the best of the image's instances by
``model.score``): the visual branch never sees the text, so the image side is computed once,
offline, as ingestion does, and the per-query cost is text encoding plus scoring. A REC model
that fuses text and image early would have to re-run the image encoder per query and image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reir.evaluation.metrics import Prediction, box_recall_at_k, br_key

# (text embedding [D], instance embeddings [n, D]) -> REC logits [n]; higher is better.
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

BASELINE_KS = (1, 5, 10)
BASELINE_TAU = 0.5


@dataclass(frozen=True)
class InstanceGallery:
    """Every gallery image's stored instances, flattened for vectorized scoring.

    Attributes:
        image_ids: ``[N]`` images that have at least one instance, sorted.
        boxes: ``[M, 4]`` float pixel ``[x, y, w, h]`` of all instances, grouped by image.
        embeddings: ``[M, D]`` float32 L2-normalized instance embeddings, same order.
        starts: ``[N]`` index of each image's first instance in ``boxes``/``embeddings``.
    """

    image_ids: tuple[str, ...]
    boxes: np.ndarray
    embeddings: np.ndarray
    starts: np.ndarray

    @classmethod
    def from_instances(cls, instances: Mapping[str, Sequence[tuple[Sequence[float], np.ndarray]]]) -> InstanceGallery:
        """``{image_id: [(box_xywh, embedding), ...]}``; images without instances are left out."""
        ids = sorted(i for i, rows in instances.items() if rows)
        if not ids:
            raise ValueError("the gallery has no instances")
        boxes: list[list[float]] = []
        embs: list[np.ndarray] = []
        starts: list[int] = []
        for image_id in ids:
            starts.append(len(boxes))
            for box, emb in instances[image_id]:
                if len(box) != 4:
                    raise ValueError(f"image {image_id!r}: box {list(box)} is not [x, y, w, h]")
                boxes.append([float(v) for v in box])
                embs.append(np.asarray(emb, dtype=np.float32).reshape(-1))
        dims = {e.shape[0] for e in embs}
        if len(dims) != 1:
            raise ValueError(f"instance embeddings have different sizes: {sorted(dims)}")
        return cls(tuple(ids), np.asarray(boxes, dtype=np.float64), np.stack(embs), np.asarray(starts))

    @property
    def sizes(self) -> np.ndarray:
        """``[N]`` instances per image."""
        return np.diff(np.append(self.starts, len(self.boxes)))

    def pooled(self) -> np.ndarray:
        """``[N, D]`` image embeddings: mean of each image's instance embeddings, L2-normalized."""
        sums = np.add.reduceat(self.embeddings.astype(np.float64), self.starts, axis=0)
        means = sums / self.sizes[:, None]
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        return (means / np.maximum(norms, 1e-12)).astype(np.float32)


def _order(scores: np.ndarray, ids: Sequence[str]) -> list[int]:
    """Indices best first; ties broken by image id so rankings are deterministic."""
    return sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))


def two_stage_rank(
    text_emb: np.ndarray, gallery: InstanceGallery, pooled: np.ndarray, score: ScoreFn, top_k: int
) -> list[Prediction]:
    """Image retrieval by ``pooled @ text`` -> REC box in each of the ``top_k`` best images."""
    text = np.asarray(text_emb, dtype=np.float32).reshape(-1)
    image_sims = pooled @ text
    best = _order(image_sims, gallery.image_ids)[:top_k]
    out = []
    for i in best:
        lo, hi = int(gallery.starts[i]), int(gallery.starts[i]) + int(gallery.sizes[i])
        logits = np.asarray(score(text, gallery.embeddings[lo:hi])).reshape(-1)
        j = lo + int(np.argmax(logits))
        out.append(Prediction(gallery.image_ids[i], tuple(gallery.boxes[j]), float(image_sims[i])))
    return out


def rec_scan_rank(text_emb: np.ndarray, gallery: InstanceGallery, score: ScoreFn, top_k: int) -> list[Prediction]:
    """REC on every image (best instance by ``score``); images ranked by that REC score."""
    text = np.asarray(text_emb, dtype=np.float32).reshape(-1)
    logits = np.asarray(score(text, gallery.embeddings), dtype=np.float64).reshape(-1)
    if logits.shape[0] != len(gallery.boxes):
        raise ValueError(f"score returned {logits.shape[0]} logits for {len(gallery.boxes)} instances")
    per_image = np.maximum.reduceat(logits, gallery.starts)
    out = []
    for i in _order(per_image, gallery.image_ids)[:top_k]:
        lo = int(gallery.starts[i])
        j = lo + int(np.argmax(logits[lo : lo + int(gallery.sizes[i])]))
        out.append(Prediction(gallery.image_ids[i], tuple(gallery.boxes[j]), float(per_image[i])))
    return out


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
