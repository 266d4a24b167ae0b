"""The model-backed halves of the baselines (:mod:`reir.evaluation.baselines`).

- :class:`GalleryReranker`: the checkpoint's re-ranker (``ReirModel.rerank_logits``, the
  computation the Serve app's :class:`reir.serving.rerank.Reranker` runs) over any set of a
  gallery's images. Every image's stored instances are packed into padded tensors once,
  offline, as the index holds them; a query then pays only for the forward passes. With
  ``cache=True`` the re-ranker's text-free half (instance projections and relation weights,
  ``RelationReranker.image_features``) is computed once too, as an index built for an
  exhaustive re-rank would store it, and a query pays only for the text-dependent half.
- :func:`encode_image_vectors`: the image-level retriever's global vector of every gallery
  image (``reir train --stage image-retrieval``), computed once at ingestion time from the
  decoded image, as ingestion decodes it.
- :func:`retrieval_text`: the retriever's vector of one encoded query.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reir.data.formats import ImageSample
from reir.evaluation.baselines import GroundFn, InstanceGallery


def _text_output(query: Any) -> tuple[Any, torch.Tensor]:
    """An :class:`EncodedQuery` -> (``TextOutput`` of one expression, attention mask ``[1, L]``)."""
    from reir.model.modeling import TextOutput

    if query.token_states is None or query.attention_mask is None:
        raise ValueError("the query was encoded without token states (the re-ranker reads them)")
    text = TextOutput(embeddings=torch.from_numpy(np.asarray(query.embedding, dtype=np.float32)[None]),
                      aux_loss=torch.zeros(()), gate_probs=torch.zeros((1, 0)),
                      token_states=torch.from_numpy(np.asarray(query.token_states, dtype=np.float32)[None]))  # fmt: skip
    return text, torch.from_numpy(np.asarray(query.attention_mask, dtype=np.int64)[None])


class GalleryReranker:
    """``ground(query)`` -> a :data:`GroundFn` scoring any of the gallery's images with the re-ranker."""

    def __init__(self, model: Any, gallery: InstanceGallery, *, cache: bool = False) -> None:
        from reir.model.rerank import pack_instance_sets

        if getattr(model, "reranker", None) is None:
            raise ValueError("the checkpoint has no trained re-ranker (reir train --stage rerank)")
        self.model = model
        groups = [range(int(lo), int(lo) + int(n)) for lo, n in zip(gallery.starts, gallery.sizes)]
        emb, boxes, objectness, mask = pack_instance_sets(
            [[gallery.embeddings[j] for j in g] for g in groups], [[gallery.boxes[j] for j in g] for g in groups],
            [[gallery.scores[j] for j in g] for g in groups], [tuple(s) for s in gallery.image_sizes],
        )  # fmt: skip
        self.tensors = [torch.from_numpy(a) for a in (emb, boxes, objectness, mask)]
        self.features = None
        if cache:
            with torch.inference_mode():
                self.features = model.reranker.image_features(*self.tensors)

    def ground(self, query: Any) -> GroundFn:
        """``query``: an :class:`reir.serving.retriever.EncodedQuery` (with token states)."""
        text, attention = _text_output(query)

        def logits(rows: np.ndarray) -> np.ndarray:
            index = torch.as_tensor(np.ascontiguousarray(rows, dtype=np.int64))
            with torch.inference_mode():
                if self.features is None:
                    out = self.model.rerank_logits(None, attention, *(t.index_select(0, index) for t in self.tensors),
                                                   text=text)  # fmt: skip
                else:
                    out = self._cached(text, attention, index)
            return out.float().numpy()

        return logits


    def _cached(self, text: Any, attention: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``ReirModel.rerank_logits`` over the cached text-free half (same logits)."""
        from reir.model.modeling import score_from_similarity

        emb = self.tensors[0].index_select(0, index)
        base = score_from_similarity(torch.einsum("d,nmd->nm", text.embeddings[0], emb), self.model.logit_scale,
                                     self.model.logit_bias)  # fmt: skip
        rows = torch.zeros(len(index), dtype=torch.long)
        return self.model.reranker.score_features(text.token_states, attention, base, self.features, text_rows=rows,
                                                  image_rows=index)  # fmt: skip


def encode_image_vectors(model: Any, processor: Any, samples: Sequence[ImageSample], *,
                         batch_size: int = 16) -> dict[str, np.ndarray]:  # fmt: skip
    """``{image_id: [D]}`` global vectors of the image-level retriever, one pass per image."""
    from reir.model.images import decode_image

    out: dict[str, np.ndarray] = {}
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        images = [decode_image(Path(s.path).read_bytes()) for s in chunk]
        with torch.inference_mode():
            vectors = model.encode_image_vectors(processor.images(images)).float().numpy()
        out.update({s.image_id: v for s, v in zip(chunk, vectors, strict=True)})
    return out


def retrieval_text(model: Any, query: Any) -> np.ndarray:
    """The image-level retriever's ``[D]`` vector of an encoded query."""
    text, attention = _text_output(query)
    with torch.inference_mode():
        return model.encode_retrieval_text(text, attention)[0].float().numpy()
