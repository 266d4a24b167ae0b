"""Relation-aware re-ranking of ANN candidates (plain class; the Serve shell is in app.py).

A candidate is one stored instance; its *context* is every stored instance of the same
image (fetched from Milvus by image id). When the model re-ranks
(``ReirModel.rerank_logits(input_ids, attention_mask, inst_emb[N,M,D], boxes[N,M,4],
objectness[N,M], inst_mask[N,M], text_index=None, presence=False) -> logits[N,M]``, with a
trained ``reranker`` module; ``presence=True`` in discover mode, for its presence head) every
instance of the N candidate images is scored with the query:
``boxes`` are normalized ``cxcywh`` relative to the image's own width/height,
``objectness`` is the stored instance score, ``inst_mask`` marks real (not padded) rows.
All instances of those images come back scored, so the re-ranker may pick an instance of a
candidate image that the ANN search did not return. Without a re-ranker the answer is the
ANN order with the calibrated score, so a checkpoint without one still serves.

Scores are probabilities (sigmoid of a logit) in both cases, which is what the
discovery threshold (``calibration.json: discover_threshold``) is compared against.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reir.model.images import upright_size
from reir.model.modeling import TextOutput
from reir.model.rerank import pack_instance_sets, pack_rows
from reir.platform.memory_index import ContextArrays
from reir.platform.store import Hit
from reir.serving.retriever import Calibration, EncodedQuery, to_numpy

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
Scored = tuple[Hit, float]


def sigmoid(x: np.ndarray | Sequence[float]) -> np.ndarray:
    """The logistic function of every element (float64), without overflow for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _calibrated(model_path: str | Path, key: str, default: float, *, required: bool, zero_ok: bool) -> float:
    """``key`` of the checkpoint's ``calibration.json`` when it is a probability (0 allowed with
    ``zero_ok``), else ``default``; a missing file, or a missing key that is not ``required``,
    gives ``default`` quietly, anything else with a warning."""
    path = Path(model_path) / CALIBRATION_FILE
    if not path.is_file():
        return default
    try:
        data = json.loads(path.read_text())
        if not required and key not in data:
            return default
        value = float(data[key])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s has no usable %s (%s); using %s", path, key, exc, default)
        return default
    if not (0.0 <= value < 1.0 if zero_ok else 0.0 < value < 1.0):
        log.warning("%s: %s %s is not a probability; using %s", path, key, value, default)
        return default
    return value


def discover_threshold_for(model_path: str | Path, default: float) -> float:
    """``discover_threshold`` from the checkpoint's ``calibration.json``, else ``default``."""
    return _calibrated(model_path, "discover_threshold", default, required=True, zero_ok=False)


def discover_gate_for(model_path: str | Path) -> float:
    """The query-level gate of discover mode (``calibration.json: discover_gate``): a query whose
    best image is under it is answered with nothing. 0 (no gate) for a checkpoint without one."""
    return _calibrated(model_path, "discover_gate", 0.0, required=False, zero_ok=True)


def ann_order(candidates: Sequence[Hit], calibration: Calibration) -> list[Scored]:
    """Candidates by ANN score (pk breaks ties), each with its calibrated probability."""
    ordered = sorted(candidates, key=lambda h: (-h.score, h.pk))
    probs = sigmoid(calibration.logits(np.asarray([h.score for h in ordered], dtype=np.float64)))
    return list(zip(ordered, probs.tolist(), strict=True))


class ImageSizes:
    """(width, height) per image: stored with the rows; for collections older than that field,
    the file header when readable, else the instances' extent."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._cache: dict[str, tuple[float, float]] = {}
        self.max_entries = max_entries

    def __call__(self, image_id: str, rows: Sequence[Hit]) -> tuple[float, float]:
        stored = next((r.image_size for r in rows if r.image_size is not None), None)
        if stored is not None:
            return stored
        if image_id in self._cache:
            return self._cache[image_id]
        size = self._from_file(rows[0].uri) if rows else None
        if size is None:
            size = (max([r.box[0] + r.box[2] for r in rows] + [1.0]), max([r.box[1] + r.box[3] for r in rows] + [1.0]))
        if len(self._cache) < self.max_entries:
            self._cache[image_id] = size
        return size

    @staticmethod
    def _from_file(uri: str) -> tuple[float, float] | None:
        try:
            with Image.open(uri) as img:  # reads the header only
                w, h = upright_size(img)  # stored boxes are in the EXIF-upright picture
                return float(w), float(h)
        except (OSError, ValueError):
            return None


class ScoredRows(Sequence[Scored]):
    """A context's rows as arrays with their probabilities, best first: ``(hit, probability)``
    pairs whose :class:`Hit` is made when it is read (a candidate's own hit where the row is
    one). Rank mode reads the first few of a head's hundreds of rows."""

    def __init__(self, context: ContextArrays, candidates: Mapping[str, Hit], order: np.ndarray,
                 probs: np.ndarray) -> None:  # fmt: skip
        self.context, self.candidates = context, candidates
        self.order, self.probs = order.tolist(), probs.tolist()

    def __len__(self) -> int:
        return len(self.order)

    def _pair(self, k: int) -> Scored:
        i = self.order[k]
        hit = self.candidates.get(self.context.pks[i])
        return (hit if hit is not None else self.context.hit(i)), self.probs[k]

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self._pair(j) for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._pair(k)

    def __iter__(self) -> Iterator[Scored]:
        return (self._pair(k) for k in range(len(self)))


class Reranker:
    """``rerank(query, candidates, context) -> [(hit, probability)]``, best first."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        calibration: Calibration,
        image_size: Callable[[str, Sequence[Hit]], tuple[float, float]] | None = None,
        max_instances: int = 64,
    ) -> None:
        self.model = model
        self.processor = processor
        self.calibration = calibration
        self.image_size = image_size or ImageSizes()
        self.max_instances = max_instances

    @property
    def can_rerank(self) -> bool:
        # ReirModel always has rerank_logits; without a trained re-ranker it only repeats the ANN scores.
        return callable(getattr(self.model, "rerank_logits", None)) and getattr(self.model, "reranker", True) is not None

    def rerank(self, query: str | EncodedQuery, candidates: Sequence[Hit],
               context: Mapping[str, Sequence[Hit]] | ContextArrays, *, presence: bool = False,
               ) -> Sequence[Scored]:  # fmt: skip
        """``query``: the text, or the query as the encoder left it (then it is not re-encoded).
        ``context``: every stored instance of the candidates' images, by image id, or as arrays
        (:meth:`reir.platform.store.MilvusStore.context_arrays`; the same answer).
        ``presence``: discover mode's presence head scores (the re-ranker without one)."""
        if not candidates:
            return []
        if not self.can_rerank:
            return ann_order(candidates, self.calibration)
        by_pk = {h.pk: h for h in candidates}
        if isinstance(context, ContextArrays):
            if int(context.counts.max(initial=0)) <= self.max_instances and all(
                    h.image_size is not None for h in context.heads):  # fmt: skip
                return self._rerank_packed(query, context, by_pk, presence)
            context = context.as_dict()
        image_ids, groups = [], []
        for image_id in dict.fromkeys(h.image_id for h in candidates):
            group = self._group(image_id, context.get(image_id, ()), by_pk)
            if group:
                image_ids.append(image_id)
                groups.append(group)
            else:  # its rows vanished between search and context fetch
                log.warning("image %s has no stored context; its candidates are dropped from re-ranking", image_id)
        if not groups:
            return ann_order(candidates, self.calibration)
        probs = sigmoid(self._logits(query, image_ids, groups, presence))
        rows = [by_pk.get(row.pk, row) for group in groups for row in group]
        order = np.lexsort((np.asarray([r.pk for r in rows]), -probs))  # best first, the pk breaks ties
        return [(rows[i], p) for i, p in zip(order.tolist(), probs[order].tolist(), strict=True)]

    def _rerank_packed(self, query: str | EncodedQuery, context: ContextArrays, candidates: Mapping[str, Hit],
                       presence: bool) -> ScoredRows:  # fmt: skip
        """:meth:`rerank` over arrays: one pack, one forward; every row comes back best first,
        its :class:`Hit` made when it is read (:class:`ScoredRows`)."""
        sizes = np.asarray([h.image_size for h in context.heads], dtype=np.float64)
        emb, boxes, objectness, mask = pack_rows(context.vectors, context.boxes, context.objectness, context.counts,
                                                 sizes)  # fmt: skip
        probs = sigmoid(self._forward(query, emb, boxes, objectness, mask, presence))
        order = np.lexsort((np.asarray(context.pks), -probs))  # best first, the pk breaks ties
        return ScoredRows(context, candidates, order, probs[order])

    def _group(self, image_id: str, rows: Sequence[Hit], candidates: Mapping[str, Hit]) -> list[Hit]:
        """The image's rows with vectors, at most ``max_instances``, never dropping a candidate."""
        rows = [r for r in rows if r.embedding is not None]
        if len(rows) <= self.max_instances:
            return rows
        wanted = [r for r in rows if r.pk in candidates]
        others = [r for r in rows if r.pk not in candidates]
        return sorted([*wanted, *others][: max(self.max_instances, len(wanted))], key=lambda r: rows.index(r))

    def _logits(self, query: str | EncodedQuery, image_ids: list[str], groups: list[list[Hit]],
                presence: bool = False) -> np.ndarray:  # fmt: skip
        """The logit of every row of ``groups``, flat, in the groups' order."""
        sizes = [self.image_size(image_id, group) for image_id, group in zip(image_ids, groups, strict=True)]
        emb, boxes, objectness, mask = pack_instance_sets(
            [[r.embedding for r in g] for g in groups], [[r.box for r in g] for g in groups],
            [[r.instance_score for r in g] for g in groups], sizes,
        )  # fmt: skip
        return self._forward(query, emb, boxes, objectness, mask, presence)

    def _forward(self, query: str | EncodedQuery, emb: np.ndarray, boxes: np.ndarray, objectness: np.ndarray,
                 mask: np.ndarray, presence: bool) -> np.ndarray:  # fmt: skip
        """The logit of every real row of the packed arrays, flat, row-major."""
        device = getattr(self.model, "device", None)
        move = (lambda t: t.to(device)) if isinstance(device, torch.device) else (lambda t: t)
        tensors = [move(torch.from_numpy(a)) for a in (emb, boxes, objectness, mask)]
        with torch.inference_mode():
            if isinstance(query, EncodedQuery) and query.token_states is not None and query.attention_mask is not None:
                encoded = TextOutput(
                    embeddings=move(torch.from_numpy(query.embedding[None].astype(np.float32))),
                    aux_loss=torch.zeros(()), gate_probs=torch.zeros((1, 0)),
                    token_states=move(torch.from_numpy(query.token_states[None].astype(np.float32))),
                )  # fmt: skip
                attention = move(torch.from_numpy(query.attention_mask[None].astype(np.int64)))
                logits = self.model.rerank_logits(None, attention, *tensors, text=encoded, presence=presence)
            else:
                text = self.processor.text([query.text if isinstance(query, EncodedQuery) else query])
                ids, attention = (move(v) if isinstance(v, torch.Tensor) else v
                                  for v in (text["input_ids"], text["attention_mask"]))
                logits = self.model.rerank_logits(ids, attention, *tensors, presence=presence)
        return to_numpy(logits).reshape(mask.shape)[mask]
