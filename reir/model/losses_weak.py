"""Weak supervision (training stage ``"weak"``): (image, expression) pairs, no referent box.

Multiple-instance contrast in the spirit of weakly supervised REC (RefCLIP): an image is a
bag of candidate instances (the dense queries of the visual branch). An expression's
score for an image is a smooth max over that image's candidates, weighted by objectness
so that background queries cannot win; a SigLIP sigmoid loss then contrasts every local
expression against every image of the global batch (positive: its own image). Because
the positive bag is pooled with a soft max, its gradient flows mostly to the candidate
that already matches the expression best, which is how the referent is found without
its box.

Many "negative" images of a batch actually hold the object (the same words were said
about another image, or the same kind of object sits there). Such pairs are suppressed
(masked, or down-weighted) instead of being pushed apart, decided without gradient from
the model's own intra-modal similarities: text-text (another image's expression is a
near duplicate) and instance-instance (the best candidate in the other image is nearly
the same embedding as the best candidate in the expression's own image).

Pure torch; rank and world size are arguments (gathers use ``torch.distributed``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .configuration import LossSpec
from .modeling import score_from_similarity


def mil_pool(logits: torch.Tensor, objectness_logits: torch.Tensor, *, temperature: float, objectness_weight: float
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Objectness-weighted smooth max of ``logits [T, N, Q]`` over each image's Q queries.

    ``pooled = tau * log sum_q p_q^(alpha / tau) * exp(s_q / tau)``: with ``p_q`` the
    objectness probability of query q (``objectness_logits [N, Q]``, read without gradient:
    the detector's prior, which the text must not teach to call whatever matches an object)
    and ``alpha`` the prior's weight, a background query pays ``alpha * log p_q`` logits.
    Returns (pooled ``[T, N]``, best query per pair ``[T, N]`` long, without gradient).
    """
    prior = objectness_weight * F.logsigmoid(objectness_logits.detach().float())
    adjusted = logits + prior[None].to(logits.dtype)
    pooled = temperature * torch.logsumexp(adjusted / temperature, dim=-1)
    return pooled, adjusted.detach().argmax(dim=-1)


# Objectness logit given to queries that are not candidates (``weak_mil_matched``): a prior
# of alpha * log sigmoid(-1e4), out of reach of any score.
UNMATCHED_LOGIT = -1.0e4

# Cosine at which two embeddings count as identical, whatever the centering says:
# the same words give the same text embedding (the built-in towers have no dropout).
IDENTICAL = 1.0 - 1e-5


def _centered_cosine(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Cosine of ``a [..., D]`` and ``b [..., D]`` after subtracting ``center [D]``, last dims paired."""
    return (F.normalize(a - center, dim=-1) * F.normalize(b - center, dim=-1)).sum(-1)


def _text_likeness(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` centered cosines of text embeddings ``a [A, D]`` and ``b [B, D]``; 2.0 where
    they are identical (above any threshold)."""
    cos = _centered_cosine(a[:, None], b[None], center)
    return torch.where((a @ b.t()) > IDENTICAL, torch.full_like(cos, 2.0), cos)


@torch.no_grad()
def suppressed_negatives(
    text_emb: torch.Tensor,
    own_image: torch.Tensor,
    all_text_emb: torch.Tensor,
    all_text_image: torch.Tensor,
    inst_emb: torch.Tensor,
    inst_weight: torch.Tensor,
    best: torch.Tensor,
    *,
    text_threshold: float,
    instance_threshold: float,
    max_fraction: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T, N]`` bool: negative (expression, image) pairs that are likely false negatives.

    ``text_emb [T, D]`` local expressions of images ``own_image [T]`` (global index);
    ``all_text_emb [U, D]`` / ``all_text_image [U]`` every expression of the global batch
    (image -1: padding); ``inst_emb [N, Q, D]`` with ``inst_weight [N, Q]`` (objectness
    probability, 0 on padding); ``best [T, N]`` each pair's best query.

    A pair is suppressed when some expression of that image has text cosine above
    ``text_threshold`` with this one (or is identical), or when the image's best candidate
    has cosine above ``instance_threshold`` with the best candidate of the expression's
    own image. Cosines are taken after removing the batch mean (texts: the mean
    expression; instances: the objectness-weighted mean instance): a barely trained
    encoder maps everything near one direction (raw text cosines of 0.98 between
    different expressions at init), which would make every negative look like a duplicate
    and leave nothing to learn from. A threshold above 1 turns that test off (for texts,
    identical ones included). Positives (own image) are never suppressed.

    Both tests are the model judging itself, so they are bounded: per expression at most
    ``max_fraction`` of the negative images (``valid [N]``: real images; default all) are
    suppressed (rounded up), the most similar first (identical texts, then by cosine). Unbounded, a
    collapsed model (every expression one vector, one embedding every image's best
    candidate) masks every negative and the loss, positives only, rewards the collapse.
    """
    t, n = text_emb.shape[0], inst_emb.shape[0]
    if t == 0:
        return torch.zeros(0, n, dtype=torch.bool, device=text_emb.device)
    # How alike (expression, image) look, where a test fires; -inf where none does.
    likeness = torch.full((t, n), float("-inf"), device=text_emb.device)
    if text_threshold <= 1.0:
        real_text = all_text_image >= 0
        text_emb, all_text_emb = text_emb.float(), all_text_emb.float()
        text_center = all_text_emb[real_text].mean(dim=0)
        cos = _text_likeness(text_emb, all_text_emb, text_center)  # [T, U]
        cos = cos.masked_fill(~((cos > text_threshold) & real_text[None, :]), float("-inf"))  # 2.0 > any threshold
        image_of = F.one_hot(all_text_image.clamp(min=0), n).bool() & real_text[:, None]  # [U, N]
        per_image = cos[:, :, None].masked_fill(~image_of[None], float("-inf")).amax(dim=1)  # [T, N]
        likeness = torch.maximum(likeness, per_image)
    emb, weight = inst_emb.detach().float(), inst_weight.float()
    inst_center = (weight[..., None] * emb).sum(dim=(0, 1)) / weight.sum().clamp(min=1e-6)
    best_emb = emb[torch.arange(n, device=best.device)[None, :], best]  # [T, N, D]
    own_best = best_emb[torch.arange(t, device=best.device), own_image]  # [T, D]
    cosine = _centered_cosine(own_best[:, None], best_emb, inst_center)  # [T, N]
    likeness = torch.maximum(likeness, cosine.masked_fill(cosine <= instance_threshold, float("-inf")))
    own = F.one_hot(own_image, n).bool()
    real = torch.ones(n, dtype=torch.bool, device=cosine.device) if valid is None else valid.bool()
    candidates = torch.isfinite(likeness) & ~own & real[None, :]
    cap = min(math.ceil(max_fraction * max(int(real.sum()) - 1, 0)), n)
    keep = torch.zeros_like(candidates)
    if cap > 0 and bool(candidates.any()):
        keep.scatter_(1, likeness.masked_fill(~candidates, float("-inf")).topk(cap, dim=1).indices, True)
    return candidates & keep


def within_image_loss(
    logits: torch.Tensor,
    objectness_logits: torch.Tensor,
    text_image: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    temperature: float,
    objectness_weight: float,
    text_threshold: float,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expressions of one image compete for its candidates; a scalar (mean over expressions).

    ``logits [T, Q]``: each local expression against the candidates of its own image
    (``text_image [T]``, objectness ``objectness_logits [T, Q]`` of that image). An image's
    expressions mostly describe different objects, so the candidate that expression t picks
    (MIL attention ``a_t = softmax_q((s_tq + alpha log p_q) / tau)``) must fit t better than
    the image's other expressions: ``P(t | q) = softmax over the image's expressions of
    s_t'q``, and ``loss_t = -log sum_q a_t(q) P(t | q)``. The cross-image contrast only asks
    that some candidate of the own image fits; this asks that it be the one the words single
    out, which is what binds "red" to the red object when every image holds something red.

    Near duplicates of t (centered text cosine above ``text_threshold``, or identical)
    leave the competition; two wordings of one object that are not caught settle at an
    even split with no net gradient between them. Expressions alone in their image (after
    that) do not count. Pure within-worker: no gather.

    ``candidates [T, Q]`` bool (the queries matched to the image's annotated boxes by the
    detection loss) limits the competition to real objects. Without it, the loss is won by
    routing: a DETR query slot has an embedding of its own whatever the image shows, so
    each wording can claim a background slot of its own (a 1,000-step run: this loss fell
    from 1.9 to 0.6 while REC accuracy fell to 10%, below chance).
    """
    t = logits.shape[0]
    if t < 2:
        return logits.sum() * 0.0
    prior = objectness_weight * F.logsigmoid(objectness_logits.detach().float()).to(logits.dtype)
    if candidates is not None:
        prior = prior.masked_fill(~candidates, float("-inf"))
        has = candidates.any(dim=1)
        if not bool(has.any()):
            return logits.sum() * 0.0
        prior = torch.where(has[:, None], prior, torch.zeros_like(prior))  # no annotated box: all queries
    attention = torch.log_softmax((logits + prior) / temperature, dim=-1)  # [T, Q] log a_t(q)
    same = text_image[:, None] == text_image[None, :]
    with torch.no_grad():
        emb = text_emb.detach().float()
        duplicate = _text_likeness(emb, emb, emb.mean(dim=0)) > min(text_threshold, 1.0)  # identical: always
        rivals = same & ~duplicate  # [T, T'] who competes with t (t itself is added below)
        eye = torch.eye(t, dtype=torch.bool, device=logits.device)
        members = rivals | eye
    # log P(t | q): t against its rivals at every candidate q of its image.
    scores = logits[None, :, :].expand(t, t, -1)  # [t, t', q] = s_t'q (same image where it counts)
    denom = torch.logsumexp(scores.masked_fill(~members[:, :, None], float("-inf")), dim=1)  # [T, Q]
    log_p = logits - denom
    per_text = -torch.logsumexp(attention + log_p, dim=-1)  # [T]
    counted = (rivals & ~eye).any(dim=1)
    if not bool(counted.any()):
        return logits.sum() * 0.0
    return per_text[counted].mean()


def _gather_rows(x: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather ``[n, ...]`` of uneven n from every worker, without gradient.

    Returns (``[W * n_max, ...]`` zero-padded, valid ``[W * n_max]`` bool, n_max).
    """
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    n_max = int(torch.stack(sizes).max())
    padded = torch.zeros((n_max, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    valid = torch.cat([torch.arange(n_max, device=x.device) < int(s) for s in sizes])
    return torch.cat(parts), valid, n_max


def weak_contrastive_loss(
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    inst_emb: torch.Tensor,
    objectness_logits: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    spec: LossSpec,
    *,
    rank: int = 0,
    world_size: int = 1,
    matched: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """MIL sigmoid contrast of local expressions against every image of the global batch.

    ``text_emb [T, D]`` and ``text_image [T]`` (index into the local images);
    ``inst_emb [B, Q, D]`` and ``objectness_logits [B, Q]`` of the local images. Only
    instances (and, without gradient, objectness and the expressions for suppression) are
    gathered: each worker scores its own expressions, so every pair of the global batch is
    counted once. Returns ``{"loss_weak": sum over pairs / T, "loss_weak_within":
    :func:`within_image_loss` (weighted by ``w_weak_within`` in the total), "weak_suppressed":
    fraction of negative pairs suppressed}``. ``matched [B, Q]`` bool (local images): the
    queries the detection loss matched to annotated boxes, the within-image competition's
    candidates (None, or ``w_weak_within`` 0: no competition, the term is 0); with
    ``weak_mil_matched`` also the candidates of the cross-image contrast.
    """
    from .losses import _gather_instances  # the autograd-aware gather CLIA uses

    offset = 0
    valid: torch.Tensor | None = None
    all_text_emb, all_text_image = text_emb.detach(), text_image
    within_objectness = objectness_logits
    if matched is not None and spec.weak_mil_matched:
        # Only annotated objects are candidates of the cross-image contrast too (an image
        # without annotated boxes keeps every query, weighted by objectness).
        keep = matched | ~matched.any(dim=1, keepdim=True)
        objectness_logits = objectness_logits.masked_fill(~keep, UNMATCHED_LOGIT)
    if world_size > 1:
        inst_emb, valid, b_max = _gather_instances(inst_emb, world_size)
        objectness_logits = _gather_rows(objectness_logits, world_size)[0]
        offset = rank * b_max
        all_text_emb, text_valid, t_max = _gather_rows(text_emb, world_size)
        images, _, _ = _gather_rows(text_image[:, None], world_size)
        # Each worker's image indices are local: shift them to the gathered numbering.
        shift = torch.arange(world_size, device=images.device).repeat_interleave(t_max) * b_max
        all_text_image = torch.where(text_valid, images[:, 0] + shift, torch.full_like(shift, -1))
    own = text_image + offset
    logits = score_from_similarity(torch.einsum("td,nqd->tnq", text_emb, inst_emb), logit_scale, logit_bias)
    pooled, best = mil_pool(logits, objectness_logits, temperature=spec.weak_temperature,
                            objectness_weight=spec.weak_objectness_weight)  # fmt: skip
    inst_weight = torch.sigmoid(objectness_logits.detach().float())
    if valid is not None:
        inst_weight = inst_weight * valid[:, None]
    suppressed = suppressed_negatives(
        text_emb.detach(), own, all_text_emb, all_text_image, inst_emb, inst_weight, best,
        text_threshold=spec.weak_text_threshold, instance_threshold=spec.weak_instance_threshold,
        max_fraction=spec.weak_max_suppressed, valid=valid,
    )  # fmt: skip
    n = inst_emb.shape[0]
    positive = F.one_hot(own, n).bool() if own.numel() else torch.zeros_like(pooled, dtype=torch.bool)
    weights = torch.where(suppressed, torch.full_like(pooled, spec.weak_suppressed_weight), torch.ones_like(pooled))
    if valid is not None:
        weights = weights * valid.to(pooled.dtype)[None, :]
    labels = positive.to(pooled.dtype) * 2 - 1
    loss = (-F.logsigmoid(labels * pooled) * weights).sum() / max(text_emb.shape[0], 1)
    negatives = ~positive if valid is None else ~positive & valid[None, :]
    fraction = suppressed.sum().float() / negatives.sum().clamp(min=1).float()
    if matched is None or spec.w_weak_within == 0:  # over every query it learns slot routing
        within = loss.new_zeros(())
    else:
        rows = torch.arange(own.shape[0], device=own.device)
        within = within_image_loss(
            logits[rows, own], within_objectness[text_image], text_image, text_emb,
            temperature=spec.weak_temperature, objectness_weight=spec.weak_objectness_weight,
            text_threshold=spec.weak_text_threshold, candidates=matched[text_image],
        )  # fmt: skip
    return {"loss_weak": loss, "loss_weak_within": within, "weak_suppressed": fraction}
