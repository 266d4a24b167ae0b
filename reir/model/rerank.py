"""Relation-aware re-ranker: a text-conditioned, one-hop relation scorer over an image's
stored instances.

The dual encoder ranks a whole gallery by one inner product per instance; it cannot check
relations it did not compress into the instance vector ("left of the red square", "the
leftmost purple one"). The re-ranker runs only on the few images that hold the top ANN
candidates and scores every stored instance ``j`` of such an image:

    logit_j = base_j + s * (a_j + sum_r g_r * [sum_{k != j} w_r(geom(j, k)) <u_r, v_k>
                                             + log(eps + sum_{k != j} w_r(geom(j, k)) p_rk)])

* ``base_j``: the dual encoder's own logit; ``s = softplus(.) >= 0``: the relation term's
  weight (it starts at 0.3, see ``__init__``);
* ``v_k = P [embedding_k, objectness_k]``: the stored instances, projected;
* ``w_r(geom(j, k))`` in (0, 1): R learned *geometric relations* (an MLP over the
  relative box geometry dx, dy, log w/w', log h/h', log area ratio): one may learn
  "k is right of j", another "k is bigger than j"; with ``RerankSpec.context_relation`` one
  more relation has ``w = 1`` for every other instance ("in the image with ...");
* ``u_r``: what the expression asks of the landmark in relation r, pooled from its tokens
  by a learned query per relation; ``g_r`` in (0, 1): whether the expression names
  relation r at all (from its pooled tokens); ``a_j = <u_0, v_j>``: a text-conditioned
  second look at the candidate itself;
* the first relation term is bilinear in (expression, landmark): quick to learn, but
  additive: look-alikes elsewhere in the image add up, and it cannot say "none";
* the second is a soft existential: ``p_rk = sigmoid(<u_r, v_k> + b_r)`` is the
  probability that ``k`` is the landmark, ``sum_k w_r p_rk`` a soft count of instances
  that are *both* in relation r to ``j`` and fit it, and its log is near 0 when one
  exists and strongly negative when none does, so a candidate missing its landmark is
  ruled out rather than outvoted.

With ``RerankSpec.image_term`` (discover mode's presence head) every instance of an image also
gets ``<u_img, P' mean_k embedding_k>``: what the expression asks of the whole image against
what its instances share.

Measured on the synthetic benchmark (docs/model.md, "The re-ranker"): with the existential term
alone the re-ranker learns slowly from real stored vectors; with the bilinear term alone it
plateaus; the sum of both raised BR@1 from about 32% to 50% on the same frozen stage-2
model. It reads only what the index stores per instance (embedding, box, objectness), so
serving never re-encodes a gallery image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .boxes import BoxMode, convert
from .configuration import RerankSpec
from .modeling_visual import Mlp

NUM_GEOMETRY = 5
LOG_EPS = 0.02  # floor of the soft landmark count inside the log: bounds "no landmark"
SCALE_INIT = 0.3  # the relation term's weight s at initialisation


# What the re-ranker reads from the expressions (RelationReranker.text_slots): the slots
# [T, R+1, h], the relation gates [T, R] and, with the image term, the image query [T, h] (else None).
TextSlots = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class Features(NamedTuple):
    """What :meth:`RelationReranker.image_features` computes once per image (``U`` images)."""

    v: torch.Tensor  # [U, M, h] the projected instances
    w: torch.Tensor  # [U, M(j), M(k), R] the relation weights
    ok: torch.Tensor  # [U, M] bool
    image_mean: torch.Tensor | None  # [U, h] (RerankSpec.image_term)
    set_base: torch.Tensor | None  # [U, M, hs] the instance set's token base (RerankSpec.set_layers)
    set_bias: torch.Tensor | None  # [U, layers * heads, M, M] its attention bias

    def rows(self, image_rows: torch.Tensor) -> Features:
        """The features of images ``image_rows`` (``index_select``: its backward is an
        ``index_add``, far cheaper on CPU than indexing's)."""
        return Features(*(None if x is None else x.index_select(0, image_rows) for x in self))


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def pack_instance_sets(
    embeddings: Sequence[Sequence[np.ndarray]],
    boxes_xywh: Sequence[Sequence[Sequence[float]]],
    scores: Sequence[Sequence[float]],
    sizes: Sequence[tuple[float, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-image instance lists (pixel ``[x, y, w, h]`` boxes, image ``(width, height)``) ->
    the padded ``emb [N, M, D]``, ``boxes [N, M, 4]`` (cxcywh normalized), ``objectness
    [N, M]`` and ``mask [N, M]`` arrays :meth:`RelationReranker.forward` reads. Every image
    needs at least one instance."""
    counts = [len(e) for e in embeddings]
    if not (len(counts) == len(boxes_xywh) == len(scores) == len(sizes)):
        raise ValueError("embeddings, boxes, scores and sizes need one entry per image")
    if any(len(b) != k or len(sc) != k for b, sc, k in zip(boxes_xywh, scores, counts, strict=True)):
        raise ValueError("each image needs as many boxes and scores as embeddings")
    if not counts or min(counts) < 1:
        raise ValueError("every image needs at least one instance")
    # All images' instances at once: one stack, one box conversion (each row with its image's size).
    return pack_rows(np.stack([np.asarray(x, dtype=np.float32) for e in embeddings for x in e]),
                     np.asarray([box for b in boxes_xywh for box in b], dtype=np.float64).reshape(-1, 4),
                     np.asarray([v for sc in scores for v in sc], dtype=np.float32), counts, sizes)  # fmt: skip


def pack_rows(
    vectors: np.ndarray,
    boxes_xywh: np.ndarray,
    objectness: np.ndarray,
    counts: Sequence[int] | np.ndarray,
    sizes: Sequence[tuple[float, float]] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pack_instance_sets` from flat rows: ``vectors [n, D]``, pixel ``boxes_xywh [n, 4]``
    and ``objectness [n]`` of several images one after another, ``counts [N]`` rows per image
    (each at least 1), ``sizes [N, 2]`` each image's (width, height)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if len(counts) == 0 or counts.min() < 1:
        raise ValueError("every image needs at least one instance")
    if not (len(vectors) == len(boxes_xywh) == len(objectness) == int(counts.sum())):
        raise ValueError(f"{len(vectors)} vectors, {len(boxes_xywh)} boxes and {len(objectness)} scores for "
                         f"{int(counts.sum())} rows")  # fmt: skip
    n, m = len(counts), int(counts.max())
    mask = np.arange(m)[None, :] < counts[:, None]  # [N, M], row-major = the images' order
    emb = np.zeros((n, m, vectors.shape[-1]), dtype=np.float32)
    boxes = np.zeros((n, m, 4), dtype=np.float32)
    packed_objectness = np.zeros((n, m), dtype=np.float32)
    emb[mask] = vectors
    wh = np.repeat(np.asarray(sizes, dtype=np.float64).reshape(-1, 2), counts, axis=0)
    boxes[mask] = convert(np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4), BoxMode.XYWH_ABS,
                          BoxMode.CXCYWH_NORM, width=wh[:, 0], height=wh[:, 1])  # fmt: skip
    packed_objectness[mask] = objectness
    return emb, boxes, packed_objectness, mask


EXP_FLOOR = -80.0  # _SmallAttention's softmax: the least argument its exp sees


class _SmallAttention(torch.autograd.Function):
    """Attention over many tiny sets (an image's ~10 instances, a head width of ~8), forward and
    backward as plain batched products of contiguous operands and a written-out softmax.

    On CPU, torch's own paths are slow at these sizes: its softmax kernel takes ~180 ns a row
    when the row is shorter than its vector width (16 floats: 10 instances), ``bmm``'s backward
    over transposed views falls back to a loop that copies every matrix, and SDPA's CPU kernels
    pay for both. On 2 cores (``bench/set_attention.py``): the instance set's attention for one
    query's 30 images 0.23 -> 0.08 ms; a re-ranker training batch (2,048 rows) forward and
    backward 46 -> 7 ms. Same values as SDPA to float rounding (tested, gradients included)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:  # fmt: skip
        n, h, m, d = q.shape
        q2, k2, v2 = (x.reshape(n * h, m, d) for x in (q, k, v))
        logits = torch.baddbmm(bias.expand(n, h, m, m).reshape(n * h, m, m), q2, k2.transpose(1, 2).contiguous(),
                               alpha=scale)  # fmt: skip
        # torch's CPU exp leaves its vector path for arguments below about -88 (the -1e4 towards
        # masked instances: 165 against 12 us for one query's 30 images), so it reads them
        # clamped, and what was below the floor is set to 0 (exp(-80) ~ 1.8e-35 adds nothing to
        # a row summing to >= 1). Exactly 0, not that tiny value: in the backward it made
        # denormal products, and a training step took 3x as long.
        shifted = logits - logits.amax(-1, keepdim=True)
        probs = shifted.clamp(min=EXP_FLOOR).exp_().masked_fill_(shifted < EXP_FLOOR, 0.0)
        probs = probs.div_(probs.sum(-1, keepdim=True))
        ctx.save_for_backward(q2, k2, v2, probs)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return torch.bmm(probs, v2).view(n, h, m, d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q2, k2, v2, probs = ctx.saved_tensors
        n, h, m, d = grad.shape
        grad = grad.reshape(n * h, m, d).contiguous()
        grad_v = torch.bmm(probs.transpose(1, 2).contiguous(), grad)
        grad_p = torch.bmm(grad, v2.transpose(1, 2).contiguous())
        grad_logits = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))
        grad_q = torch.bmm(grad_logits, k2).mul_(ctx.scale)
        grad_k = torch.bmm(grad_logits.transpose(1, 2).contiguous(), q2).mul_(ctx.scale)
        grad_bias = grad_logits.view(n, h, m, m)
        if grad_bias.shape != ctx.bias_shape:
            grad_bias = grad_bias.sum_to_size(ctx.bias_shape)
        return (grad_q.view(n, h, m, d), grad_k.view(n, h, m, d), grad_v.view(n, h, m, d),
                grad_bias if ctx.needs_input_grad[3] else None, None)  # fmt: skip


def set_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` for ``q, k, v [N, H, M, d]`` (one dtype) and a float
    ``bias`` broadcastable to ``[N, H, M, M]`` (cast to ``q``'s dtype): :class:`_SmallAttention` on
    CPU in float32/64, torch's SDPA elsewhere (GPU kernels, autocast's bfloat16)."""
    bias = bias.to(q.dtype)
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return _SmallAttention.apply(q, k, v, bias, 1.0 / math.sqrt(q.shape[-1]))


class InputDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with its mask drawn by ``rand < 1 - p`` on CPU: torch's CPU
    ``bernoulli_`` took 16-18 ms for a re-ranker batch's 1.5M inputs on 2 cores, this 6-7 ms.
    The same distribution (each input kept with probability ``1 - p``, scaled by ``1 / (1 - p)``),
    another random stream; no parameters, so checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        keep = torch.rand(x.shape, dtype=x.dtype, device=x.device) < 1.0 - self.p
        return x * keep * (1.0 / (1.0 - self.p))


# rows x width^2 a split must save (width_groups): about 32 rows of 16 instances
MIN_SPLIT_SAVING = 8192.0


def width_groups(counts: torch.Tensor, uses: torch.Tensor) -> list[torch.Tensor]:
    """Images (positions in ``counts``, their instance counts; ``uses``: rows scored on each) in
    one or two groups by count: the split that minimises the sum over groups of rows x the
    group's widest set squared, a proxy of the pairwise terms' work; one group (every image)
    when splitting saves under a fifth of it or under ``MIN_SPLIT_SAVING`` (a second pass has
    its own fixed cost: at one query's 30 images, one CPU thread, a split cost more than it
    saved)."""
    order = torch.argsort(counts, stable=True)
    if len(order) < 2:
        return [order]
    widths = counts[order].clamp(min=1).double() ** 2
    rows = torch.cumsum(uses[order].double(), 0)
    total = float(rows[-1])
    # split after position i: the first group is as wide as its last image, the second as the widest
    cost = rows[:-1] * widths[:-1] + (total - rows[:-1]) * float(widths[-1])
    best = int(torch.argmin(cost))
    whole = total * float(widths[-1])
    if whole - float(cost[best]) < max(0.2 * whole, MIN_SPLIT_SAVING):
        return [order]
    return [order[: best + 1], order[best + 1 :]]


def _heads(width: int) -> int:
    """Attention heads for a ``width``-wide layer: 4 when they divide it, else 1."""
    return 4 if width % 4 == 0 else 1


def relative_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes [N, M, 4]`` cxcywh -> ``[N, M, M, 5]``: geometry of k seen from j (``[n, j, k]``)."""
    eps = 1e-3
    cx, cy, w, h = boxes.unbind(-1)
    w, h = w.clamp(min=eps), h.clamp(min=eps)
    dx = cx[:, None, :] - cx[:, :, None]
    dy = cy[:, None, :] - cy[:, :, None]
    lw = torch.log(w[:, None, :] / w[:, :, None])
    lh = torch.log(h[:, None, :] / h[:, :, None])
    return torch.stack([dx * 4, dy * 4, lw, lh, lw + lh], dim=-1)


class InstanceSet(nn.Module):
    """``RerankSpec.set_layers`` pre-norm transformer layers over each scored image's instances,
    after the relation terms: instance ``j``'s token is its projected vector and box plus what the
    expression asks of it (its own slot, its match as each relation's landmark, its soft landmark
    counts) and a summary of the expression; attention between ``j`` and ``k`` is biased by their
    relative geometry (per head). Its output adds one logit per instance and starts at zero.
    One-hop relation terms score each candidate on its own; here instances see each other, which
    "the second circle from the left" and "the bigger of the two" need."""

    def __init__(self, spec: RerankSpec, relations: int) -> None:
        super().__init__()
        h, hs = spec.hidden_size, spec.set_hidden
        self.heads = _heads(hs)
        self.inst = nn.Linear(h, hs)
        self.box = nn.Linear(4, hs)
        self.asked = nn.Linear(1 + 2 * relations, hs)  # own slot, landmark matches, log soft counts
        self.text = nn.Linear((relations + 1) * h, hs)
        self.geometry = Mlp(NUM_GEOMETRY, spec.geometry_hidden, self.heads * spec.set_layers)
        # Written out rather than nn.TransformerEncoderLayer: in eval mode that takes a fused fast
        # path which returned NaN for these per-head float masks (rows of padding masked by -1e4).
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(hs), "qkv": nn.Linear(hs, 3 * hs), "proj": nn.Linear(hs, hs),
                           "norm2": nn.LayerNorm(hs), "mlp": Mlp(hs, 2 * hs, hs)})
            for _ in range(spec.set_layers))  # fmt: skip
        self.norm = nn.LayerNorm(hs)
        self.out = nn.Linear(hs, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def image_part(self, v: torch.Tensor, boxes: torch.Tensor, geometry: torch.Tensor,
                   ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Text-free, per image, from the projected instances ``v``, their boxes and
        :func:`relative_geometry`: the tokens' base ``[U, M, hs]`` and the attention bias
        ``[U, layers * heads, M, M]`` (``-1e4`` towards masked instances)."""
        bias = self.geometry(geometry).permute(0, 3, 1, 2)  # [U, L*H, M(j), M(k)]
        return self.inst(v) + self.box(boxes), bias.masked_fill(~ok[:, None, None, :], -1e4)

    def forward(self, base: torch.Tensor, bias: torch.Tensor, asked: torch.Tensor, slots: torch.Tensor,
                text_rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``base [N, M, hs]``, ``bias [N, L*H, M, M]``, ``asked [N, M, 1 + 2R]``, the expressions'
        slots ``[T, R+1, h]`` and the expression of each row ``text_rows [N]`` -> ``[N, M]``."""
        n, m, hs = base.shape
        text = self.text(slots.flatten(1)).index_select(0, text_rows)  # once per expression, then per row
        x = base + self.asked(asked) + text[:, None, :]
        for i, layer in enumerate(self.layers):
            q, k, v = layer["qkv"](layer["norm1"](x)).view(n, m, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            att = set_attention(q, k, v, bias[:, i * self.heads : (i + 1) * self.heads])  # [N, H, M, hs / H]
            x = x + layer["proj"](att.transpose(1, 2).reshape(n, m, hs))
            x = x + layer["mlp"](layer["norm2"](x))
        return self.out(self.norm(x)).squeeze(-1)


class RelationReranker(nn.Module):
    """``(expression tokens, instance set) -> logit per instance``; see the module docstring."""

    def __init__(self, spec: RerankSpec, text_hidden: int, embed_dim: int) -> None:
        super().__init__()
        h = spec.hidden_size
        # the learned geometric relations, then (RerankSpec.context_relation) the image-wide one
        r = spec.num_relations + int(spec.context_relation)
        self.spec = spec
        self.text_norm = nn.LayerNorm(text_hidden)
        self.text_encoder: nn.TransformerEncoder | None = None
        if spec.text_layers > 0:
            layer = nn.TransformerEncoderLayer(text_hidden, nhead=_heads(text_hidden), dim_feedforward=2 * text_hidden,
                                               dropout=0.0, batch_first=True, norm_first=True)
            self.text_encoder = nn.TransformerEncoder(layer, spec.text_layers, enable_nested_tensor=False)
        self.text_key = nn.Linear(text_hidden, h)
        self.text_value = nn.Linear(text_hidden, h)
        # slot 0: the candidate itself; the scale: RerankSpec.query_init
        self.queries = nn.Parameter(torch.randn(r + 1, h) * spec.query_init / math.sqrt(h))
        self.gate = nn.Linear(text_hidden, r)  # does the expression name relation r?
        # Landmark probabilities start low: a soft count of ~0 until text and instances agree.
        self.match_bias = nn.Parameter(torch.full((r,), -2.0))
        self.input_dropout = InputDropout(spec.input_dropout)  # training only (RerankSpec)
        self.inst = nn.Sequential(nn.Linear(embed_dim + 1, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, h))
        self.geometry = Mlp(NUM_GEOMETRY, spec.geometry_hidden, spec.num_relations)
        # The relation term is weighted by s = softplus(scale_raw) >= 0. The earlier form, a
        # free factor starting at exactly 0 (the identity on the dual encoder's logits), got all
        # of the first gradient and took the sign of the random terms' first correlation with
        # the target: negative on half the seeds, which inverts the existential term (a
        # candidate with its landmark below one without) and ended 25 points of BR@1 lower.
        # Starting at 0.3 the other weights learn from the first step (docs/model.md, "The
        # re-ranker"; docs/decisions.md).
        self.scale_raw = nn.Parameter(torch.full((1,), _inverse_softplus(SCALE_INIT)))
        self.instance_set = InstanceSet(spec, r) if spec.set_layers > 0 else None
        self.image_query: nn.Parameter | None = None
        self.image_value: nn.Linear | None = None
        self.image_proj: nn.Linear | None = None
        if spec.image_term:
            self.image_query = nn.Parameter(torch.randn(h) / math.sqrt(h))
            # zero at the start: a head copied from one without the term scores as it did
            self.image_value = nn.Linear(text_hidden, h)
            nn.init.zeros_(self.image_value.weight)
            nn.init.zeros_(self.image_value.bias)
            # its own projection of the stored vectors' mean: the instance projection was trained
            # for rank mode and keeps little of what the instances share
            self.image_proj = nn.Linear(embed_dim, h)

    @property
    def scale(self) -> torch.Tensor:
        """The relation term's weight ``s >= 0``."""
        return F.softplus(self.scale_raw)

    @torch.no_grad()
    def set_scale(self, value: float) -> None:
        """Set ``s`` (> 0)."""
        self.scale_raw.fill_(_inverse_softplus(value))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Weights of the earlier, bilinear-only form (gate over R+1 slots, no match_bias)
        # cannot be scored by this one: say so rather than a bare shape mismatch.
        if prefix + "gate.weight" in state_dict and prefix + "match_bias" not in state_dict:
            raise ValueError(
                "the checkpoint's re-ranker has the earlier bilinear-only form (no existential relation "
                "term); retrain it on the same stage-2 model with `reir train --stage rerank`"
            )
        if prefix + "scale" in state_dict and prefix + "scale_raw" not in state_dict:
            # the earlier form's free factor: the same model when it is positive
            old = float(state_dict.pop(prefix + "scale").reshape(-1)[0])
            if old <= 0:
                raise ValueError(
                    f"the checkpoint's re-ranker has a relation weight of {old:.4g} (<= 0), which this form "
                    "cannot hold; retrain it on the same stage-2 model with `reir train --stage rerank`"
                )
            state_dict[prefix + "scale_raw"] = torch.full((1,), _inverse_softplus(old))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def text_slots(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> TextSlots:
        """``[T, L, Ht]`` -> ``[T, R+1, h]`` (slot 0: the candidate, then what the expression
        asks of the landmark of each relation), the relation gates ``[T, R]`` and, with
        ``spec.image_term``, what it asks of the whole image ``[T, h]`` (else None)."""
        x = self.text_norm(text_states)
        if self.text_encoder is not None:
            x = self.text_encoder(x, src_key_padding_mask=~text_mask.bool())
        keys, values = self.text_key(x), self.text_value(x)
        ignore = ~text_mask.bool()
        att = torch.einsum("rh,tlh->trl", self.queries, keys) / math.sqrt(keys.shape[-1])
        att = att.masked_fill(ignore[:, None, :], torch.finfo(att.dtype).min).softmax(dim=-1)
        mask = text_mask.to(x.dtype)[..., None]
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        image = None
        if self.image_query is not None and self.image_value is not None:
            a = (keys @ self.image_query) / math.sqrt(keys.shape[-1])  # [T, L]
            a = a.masked_fill(ignore, torch.finfo(a.dtype).min).softmax(dim=-1)
            image = torch.einsum("tl,tlh->th", a, self.image_value(x))
        return torch.einsum("trl,tlh->trh", att, values), torch.sigmoid(self.gate(pooled)), image

    def image_features(
        self, inst_emb: torch.Tensor, boxes: torch.Tensor, objectness: torch.Tensor, inst_mask: torch.Tensor
    ) -> Features:
        """The text-free half of :meth:`forward`, per image: the projected instances ``v [U, M, h]``,
        the relation weights ``w [U, M(j), M(k), R]``, the mask ``[U, M]``, with
        ``spec.image_term`` the projected mean of the image's stored vectors ``[U, h]`` and with
        ``spec.set_layers`` the instance set's token base and attention bias
        (:meth:`InstanceSet.image_part`) (else None). It depends only on what the index stores, so a caller that scores the same
        images for many expressions can compute it once (:meth:`score_features`)."""
        m = inst_emb.shape[1]
        ok = inst_mask.bool()
        v = self.inst(self.input_dropout(torch.cat([inst_emb, objectness[..., None].to(inst_emb.dtype)], dim=-1)))
        geometry = relative_geometry(boxes)
        w = torch.sigmoid(self.geometry(geometry))  # [U, M(j), M(k), R]
        if self.spec.context_relation:  # every other instance, wherever it is
            w = torch.cat([w, torch.ones_like(w[..., :1])], dim=-1)
        pair_ok = ok[:, None, :] & ~torch.eye(m, dtype=torch.bool, device=inst_emb.device)[None]
        image_mean = None
        if self.image_proj is not None:
            okf = ok.to(inst_emb.dtype)[..., None]
            image_mean = self.image_proj((inst_emb * okf).sum(1) / okf.sum(1).clamp(min=1.0))
        set_base = set_bias = None
        if self.instance_set is not None:
            set_base, set_bias = self.instance_set.image_part(v, boxes, geometry, ok)
        return Features(v, w * pair_ok[..., None].to(w.dtype), ok, image_mean, set_base, set_bias)

    def forward(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        base_logits: torch.Tensor,
        inst_emb: torch.Tensor,
        boxes: torch.Tensor,
        objectness: torch.Tensor,
        inst_mask: torch.Tensor,
        text_rows: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        text: TextSlots | None = None,
    ) -> torch.Tensor:
        """Per-instance logits ``[N, M]`` (``-inf`` where the instance is masked).

        Args:
            text_states: ``[T, L, Ht]`` token states of the expressions; ``text_mask [T, L]``.
            base_logits: ``[N, M]`` the dual encoder's logits for (expression, instance).
            inst_emb: ``[U, M, D]`` stored instance embeddings; ``boxes [U, M, 4]`` cxcywh
                normalized; ``objectness [U, M]`` probabilities; ``inst_mask [U, M]`` bool.
            text_rows: ``[N]`` which expression each candidate image is scored for
                (default: ``arange(N)``, i.e. ``T == N``).
            image_rows: ``[N]`` which of the ``U`` images each candidate row is (default:
                ``arange(N)``, i.e. ``U == N``). Rows that share an image share its instance
                projection and relation weights: computed once per image, the text-free half
                of the work no longer grows with the number of expressions scored on it.
            text: :meth:`text_slots` of ``text_states`` computed beforehand (a caller scoring
                the same expressions in several calls), else computed here.
        """
        n, m = base_logits.shape
        ok = inst_mask.bool()
        counts = ok.sum(dim=1).cpu()
        uses = torch.ones(len(counts)) if image_rows is None else torch.bincount(image_rows.cpu(), minlength=len(counts))
        groups = width_groups(counts, uses)
        if len(groups) == 1:  # one pass, at the widest set's width
            width = max(1, int(counts.max()) if len(counts) else 1)
            features = self.image_features(inst_emb[:, :width], boxes[:, :width], objectness[:, :width],
                                           ok[:, :width])  # fmt: skip
            logits = self.score_features(text_states, text_mask, base_logits[:, :width], features, text_rows,
                                         image_rows, text)  # fmt: skip
            return logits if width == m else F.pad(logits, (0, m - width), value=float("-inf"))
        # Short and long sets apart, each at its own width: the pairwise terms' work grows with the
        # square of it, and a score floor stores few instances in most images and many in a few
        # (docs/model.md, "Stored instances"). Exact: padded instances are masked either way.
        if text_rows is None:
            text_rows = torch.arange(n, device=base_logits.device)
        if image_rows is None:
            image_rows = torch.arange(n, device=base_logits.device)
        if text is None:
            text = self.text_slots(text_states, text_mask)
        out = base_logits.new_full((n, m), float("-inf"))
        rows_cpu = image_rows.cpu()
        position = torch.empty(len(counts), dtype=torch.long)  # an image's index within its group
        for members in groups:
            width = max(1, int(counts[members].max()))
            position[members] = torch.arange(len(members))
            picked = torch.isin(rows_cpu, members).nonzero().squeeze(1)  # the rows scored on these images
            picked_dev, members_dev = picked.to(base_logits.device), members.to(base_logits.device)
            features = self.image_features(inst_emb[members_dev, :width], boxes[members_dev, :width],
                                           objectness[members_dev, :width], ok[members_dev, :width])  # fmt: skip
            out[picked_dev, :width] = self.score_features(
                text_states, text_mask, base_logits[picked_dev, :width], features, text_rows[picked_dev],
                position[rows_cpu[picked]].to(base_logits.device), text)  # fmt: skip
        return out

    def score_features(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        base_logits: torch.Tensor,
        features: Features,
        text_rows: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        text: TextSlots | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` from :meth:`image_features` (and :meth:`text_slots`) computed beforehand."""
        if image_rows is not None:
            features = features.rows(image_rows)
        v, w, ok, image_mean, set_base, set_bias = features
        n, m = base_logits.shape
        device = base_logits.device
        if text_rows is None:
            text_rows = torch.arange(n, device=device)
        slots, gate, image = text if text is not None else self.text_slots(text_states, text_mask)
        t = slots.shape[0]
        if n % t == 0 and torch.equal(text_rows, torch.arange(t, device=device).repeat_interleave(n // t)):
            # Rows grouped by expression (every caller's layout): one [R+1, h] x [h, C*M]
            # product per expression instead of N tiny ones.
            h = v.shape[-1]
            match = torch.einsum("trh,tch->trc", slots, v.reshape(t, -1, h))  # c runs over (row, instance)
            match = match.view(t, -1, n // t, m).transpose(1, 2).reshape(n, -1, m)
            gate = gate.repeat_interleave(n // t, dim=0)
        else:
            match = torch.einsum("nrh,nmh->nrm", slots.index_select(0, text_rows), v)
            gate = gate.index_select(0, text_rows)
        match = match / math.sqrt(v.shape[-1])  # [N, R+1, M]
        landmark = torch.sigmoid(match[:, 1:] + self.match_bias[None, :, None])  # [N, R, M(k)]
        count = torch.einsum("njkr,nrk->njr", w, landmark)  # soft count per (candidate, relation)
        log_count = torch.log(count + LOG_EPS)
        exists = (gate[:, None, :] * log_count).sum(dim=-1)  # [N, M]
        additive = torch.einsum("njkr,nrk->nj", w, match[:, 1:] * gate[..., None])
        delta = self.scale * (match[:, 0] + additive + exists)
        if self.instance_set is not None:
            assert set_base is not None and set_bias is not None
            asked = torch.cat([match.transpose(1, 2), log_count], dim=-1)  # [N, M, 1 + 2R]
            delta = delta + self.instance_set(set_base, set_bias, asked, slots, text_rows)
        if image is not None:  # the same for every instance of a row's image
            assert image_mean is not None
            delta = delta + (image.index_select(0, text_rows) * image_mean).sum(-1, keepdim=True) / math.sqrt(
                image_mean.shape[-1])
        return (base_logits + delta).masked_fill(~ok, float("-inf"))
