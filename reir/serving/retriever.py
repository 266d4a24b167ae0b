"""The query path's model-side pieces: the text encoder, the score calibration, the result.

The stages themselves (search, re-rank, answer) are :class:`reir.serving.pipeline.QueryPipeline`,
the one query path that the HTTP route, ``reir eval`` and notebooks all run.

Scoring. The model scores a (text, instance) pair with a SigLIP-style logit
``scale * <t, i> + bias``. That is affine in the inner product Milvus already returns,
so :class:`Calibration` recovers ``scale`` and ``bias`` once by probing
``model.score`` with unit vectors, and ranking needs neither the model nor the stored
vectors: the searcher (which holds the store) can run without the model, and the
text encoder (which holds the model) can batch on its own. ``Result.score`` is the
sigmoid of that logit (a probability); ``ann_score`` keeps the raw IP.

Dedupe. Instances of one image that overlap a better-scored kept box of that image
by IoU >= ``dedupe_iou`` are dropped (near-duplicate detections), other boxes of the
same image stay: the result is (image, box) pairs, not one per image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from reir.platform.modeling import (
    TextModel,
    TextProcessor,
)

log = logging.getLogger(__name__)


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Calibration:
    """``logit = scale * ip + bias``; ``exact`` is False when the probe found no affine fit."""

    scale: float = 1.0
    bias: float = 0.0
    exact: bool = True

    def logits(self, ip: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(ip, dtype=np.float64) + self.bias

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def probe(cls, score: Callable[[np.ndarray, np.ndarray], np.ndarray], dim: int) -> Calibration:
        """Fit scale/bias from ``score(text[1,D], inst[N,D]) -> logits`` and verify the fit."""
        eye = np.eye(dim, dtype=np.float32)
        text = eye[:1]
        rng = np.random.default_rng(0)
        rand = rng.normal(size=(8, dim)).astype(np.float32)
        rand /= np.linalg.norm(rand, axis=1, keepdims=True)
        insts = np.concatenate([eye[:1], -eye[:1], eye[1:2] if dim > 1 else eye[:1] * 0, rand])
        logits = np.asarray(score(text, insts), dtype=np.float64).reshape(-1)
        scale = (logits[0] - logits[1]) / 2.0
        bias = (logits[0] + logits[1]) / 2.0
        predicted = scale * (insts @ text[0]).astype(np.float64) + bias
        tol = 1e-3 * max(1.0, abs(scale), abs(bias))
        if scale <= 0 or not np.allclose(predicted, logits, atol=tol):
            log.warning("model.score is not an increasing affine map of the IP; ranking by raw IP")
            return cls(1.0, 0.0, exact=False)
        return cls(float(scale), float(bias), exact=True)


@dataclass(frozen=True)
class Result:
    image_id: str
    uri: str
    box: tuple[float, float, float, float]
    score: float
    logit: float = 0.0
    ann_score: float = 0.0
    instance_score: float = 0.0
    pk: str = ""
    refined: bool = False  # the localize stage replaced the stored box

    def to_wire(self) -> dict[str, Any]:
        """The HTTP result object: ``{"image_id","uri","box","score","refined"}``."""
        return {"image_id": self.image_id, "uri": self.uri, "box": list(self.box), "score": self.score,
                "refined": self.refined}


@dataclass(frozen=True)
class EncodedQuery:
    """One query text as the text tower left it: what the search and the re-ranker both need.

    ``embedding [D]`` L2-normalized; ``token_states [L, H]`` and ``attention_mask [L]`` the
    tower's last hidden states (None when the model gives none: the re-ranker then encodes
    the text itself). Encoding once and passing this on saves the re-ranker a text forward.
    """

    text: str
    embedding: np.ndarray
    token_states: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    tokens: int = 0  # the text's tokens before truncation (0: the processor does not say)
    token_limit: int = 0  # the most tokens the text tower reads (the processor's max_length)

    @property
    def truncated(self) -> bool:
        """The text had more tokens than the tower reads: its end was ignored."""
        return 0 < self.token_limit < self.tokens


def token_counts(processor: TextProcessor, texts: Sequence[str], read: Sequence[int] | None = None,
                 ) -> tuple[list[int], int]:  # fmt: skip
    """(tokens per text before truncation, the processor's limit); zeros when the processor
    cannot tell (a model without ``token_counts``), so truncation is then never reported.
    ``read``: the tokens the model read of each text (its attention mask's sum): a text read
    short of the limit was not cut, so only those that reached it are tokenized again."""
    count = getattr(processor, "token_counts", None)
    limit = int(getattr(processor, "max_length", 0) or 0)
    if count is None or limit <= 0:
        return [0] * len(texts), 0
    if read is None:
        return [int(n) for n in count(list(texts))], limit
    counts = [int(n) for n in read]
    full = [i for i, n in enumerate(counts) if n >= limit]
    for i, n in zip(full, count([texts[i] for i in full]) if full else (), strict=True):
        counts[i] = int(n)
    return counts, limit


class QueryEncoder:
    """Texts -> L2-normalized embeddings with the model (``reir.model`` contract)."""

    def __init__(self, model: TextModel, processor: TextProcessor, *, model_version: str = "") -> None:
        self.model = model
        self.processor = processor
        self.model_version = model_version

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([q.embedding for q in self.encode_queries(texts)])

    def encode_queries(self, texts: Sequence[str]) -> list[EncodedQuery]:
        """One :class:`EncodedQuery` per text (one forward pass for all)."""
        if not texts:
            raise ValueError("no texts to encode")
        with torch.inference_mode():
            batch = self.processor.text(list(texts))
            out = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        emb = to_numpy(out.embeddings).reshape(len(texts), -1)
        # The model already normalizes; renormalizing keeps IP == cosine regardless.
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        states = getattr(out, "token_states", None)
        states = None if states is None else to_numpy(states)
        mask = to_numpy(batch["attention_mask"]) if states is not None else None
        read = None if batch["attention_mask"] is None else to_numpy(batch["attention_mask"]).reshape(len(texts), -1)
        counts, limit = token_counts(self.processor, texts, read=None if read is None else read.sum(axis=1))
        return [EncodedQuery(text, emb[i], None if states is None else states[i], None if mask is None else mask[i],
                             tokens=counts[i], token_limit=limit) for i, text in enumerate(texts)]  # fmt: skip

    def score(self, text_emb: np.ndarray, inst_emb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model.score(torch.as_tensor(text_emb), torch.as_tensor(inst_emb))
        return to_numpy(logits)

    @cached_property
    def dim(self) -> int:
        return int(self.encode(["a"]).shape[1])

    @cached_property
    def calibration(self) -> Calibration:
        return Calibration.probe(self.score, self.dim)
