"""Stage ``rerank``: train the relation-aware re-ranker on top of a frozen dual encoder.

The re-ranker sees exactly what serving gives it: the instances an ingestion stored per
image (post-processed top-K: embedding, box, objectness), so the training set is built
the same way, once, with the frozen visual branch. Each expression is then contrasted,
listwise, against every instance of its own image and of ``num_negatives`` *hard*
negative images: the images of its negative group (``reir.data.negative_groups``) that
the dual encoder ranks highest, i.e. the images the ANN search would hand the re-ranker.
Loss: cross-entropy over all those instances (the referent is the target) plus a small
sigmoid term that keeps the logits calibrated as probabilities (presence decisions).

Stage ``weak-rerank`` trains the same re-ranker from (image, expression) pairs alone, on a
frozen weak-stage model: each image is a bag of its stored instances and the own image
must beat the hard negatives (:func:`rerank_loss`).

Pure torch (no Ray): the Ray Train + DeepSpeed loop in ``reir.training.trainer`` calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from reir.data.formats import ImageSample
from reir.evaluation.discovery import Judged, gate_for, tally
from reir.model.boxes import BoxMode, convert, cxcywh_to_xyxy, pairwise_iou_xyxy
from reir.model.modeling import ReirModel
from reir.model.processing import NO_REFERENT, ReirProcessor
from reir.model.rerank import RelationReranker


@dataclass
class RerankSet:
    """Frozen features of a training shard (N images, T usable expressions)."""

    image_ids: list[str]
    emb: torch.Tensor  # [N, K, D]
    boxes: torch.Tensor  # [N, K, 4] cxcywh normalized
    objectness: torch.Tensor  # [N, K]
    mask: torch.Tensor  # [N, K] bool
    groups: torch.Tensor  # [N] long
    token_states: torch.Tensor  # [T, L, H]
    token_mask: torch.Tensor  # [T, L]
    text_emb: torch.Tensor  # [T, D]
    text_image: torch.Tensor  # [T] long, image row of each expression
    positive: torch.Tensor  # [T] long, instance slot of the referent in its image (-1: weak)
    skipped: int = 0  # expressions whose referent no stored instance covers (IoU < min_iou; weak: no instance)
    weak: bool = False  # no referent slots: only each expression's image is known

    @property
    def num_texts(self) -> int:
        return int(self.text_image.numel())


def _cxcywh_norm(boxes_xywh: Sequence[Sequence[float]], width: int, height: int) -> torch.Tensor:
    """Pixel ``[x, y, w, h]`` boxes -> ``[n, 4]`` normalized cxcywh (the model's convention)."""
    xywh = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return torch.as_tensor(convert(xywh, BoxMode.XYWH_ABS, BoxMode.CXCYWH_NORM, width=width, height=height)).float()


@torch.no_grad()
def build_rerank_set(
    model: ReirModel,
    processor: ReirProcessor,
    samples: Sequence[ImageSample],
    groups: Sequence[int],
    load_image: Callable[[str], Image.Image],
    *,
    top_k: int | None = None,
    min_score: float | None = None,
    batch_size: int = 32,
    min_iou: float = 0.5,
    weak: bool = False,
) -> RerankSet:
    """Encode ``samples`` as ingestion would and pair every expression with its referent slot.
    ``top_k`` / ``min_score``: the stored-instance policy (unset: the processor's).

    ``weak``: the rows carry no referent box (``NO_REFERENT``, stage ``weak-rerank``): every
    expression is kept with ``positive = -1`` and only its image is known. Without
    ``weak`` such a row is an error that names its image."""
    device = model.device
    n, dim = len(samples), model.config.embed_dim
    top_k = processor.instance_top_k if top_k is None else top_k
    emb = torch.zeros(n, top_k, dim)
    boxes = torch.zeros(n, top_k, 4)
    obj = torch.zeros(n, top_k)
    mask = torch.zeros(n, top_k, dtype=torch.bool)
    for start in range(0, n, batch_size):
        chunk = samples[start : start + batch_size]
        images = [load_image(s.path) for s in chunk]
        out = model.encode_images(processor.images(images).to(device))
        sizes = [(s.width, s.height) for s in chunk]
        for i, (s, insts) in enumerate(zip(chunk, processor.postprocess(out, sizes=sizes, top_k=top_k, min_score=min_score))):
            k = len(insts)
            if k:
                emb[start + i, :k] = torch.as_tensor(np.stack([inst.embedding for inst in insts]))
                boxes[start + i, :k] = _cxcywh_norm([inst.box_xywh for inst in insts], s.width, s.height)
                obj[start + i, :k] = torch.tensor([inst.score for inst in insts])
                mask[start + i, :k] = True
    texts, text_image, positive, skipped = [], [], [], 0
    for row, s in enumerate(samples):
        if not s.refs:
            continue
        if weak:
            if not bool(mask[row].any()):  # nothing stored for this image: no bag to score
                skipped += len(s.refs)
                continue
            for text, _ in s.refs:
                texts.append(text)
                text_image.append(row)
                positive.append(NO_REFERENT)
            continue
        missing = [text for text, j in s.refs if j == NO_REFERENT]
        if missing:
            raise ValueError(f"expression {missing[0]!r} of image {s.image_id!r} has no referent box (a weak row): "
                             "stage rerank needs the box; train such rows with stage 'weak-rerank'")
        gts = _cxcywh_norm([s.boxes[j] for _, j in s.refs], s.width, s.height)
        ious = pairwise_iou_xyxy(cxcywh_to_xyxy(gts), cxcywh_to_xyxy(boxes[row]))[0] * mask[row][None]
        best, slot = ious.max(dim=1)
        for (text, _), b, k in zip(s.refs, best.tolist(), slot.tolist()):
            if b < min_iou:
                skipped += 1
                continue
            texts.append(text)
            text_image.append(row)
            positive.append(k)
    token_states, token_mask, text_emb = encode_texts(model, processor, texts)
    return RerankSet(
        image_ids=[s.image_id for s in samples], emb=emb, boxes=boxes, objectness=obj, mask=mask,
        groups=torch.as_tensor(list(groups), dtype=torch.long), token_states=token_states,
        token_mask=token_mask, text_emb=text_emb,
        text_image=torch.tensor(text_image, dtype=torch.long),
        positive=torch.tensor(positive, dtype=torch.long), skipped=skipped, weak=weak,
    )  # fmt: skip


@torch.no_grad()
def encode_texts(model: ReirModel, processor: ReirProcessor,
                 texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The frozen text tower's token states ``[T, L, H]``, mask ``[T, L]`` (long) and
    embeddings ``[T, D]`` of ``texts``, on the CPU.

    The texts are encoded in batches of similar length (by characters) and put back in their
    order: a batch pads to its longest text, and in batches drawn as they came most texts
    were padded to nearly the longest of all."""
    if not texts:
        return torch.zeros(0, 1, model.text_hidden_size), torch.zeros(0, 1, dtype=torch.long), \
            torch.zeros(0, model.config.embed_dim)
    device = model.device
    order = torch.tensor(sorted(range(len(texts)), key=lambda i: len(texts[i])))
    batches = []
    for start in range(0, len(texts), 256):
        rows = order[start : start + 256]
        enc = processor.text([texts[i] for i in rows.tolist()])
        enc = {k: v.to(device) for k, v in enc.items()}
        out_t = model.encode_text(enc["input_ids"], enc["attention_mask"])
        assert out_t.token_states is not None
        batches.append((rows, out_t.token_states.float().cpu(), enc["attention_mask"].cpu(),
                        out_t.embeddings.float().cpu()))
    length = max(b[1].shape[1] for b in batches)
    states = torch.zeros(len(texts), length, batches[0][1].shape[2])
    tmask = torch.zeros(len(texts), length, dtype=torch.long)
    temb = torch.zeros(len(texts), batches[0][3].shape[1])
    for rows, s, m, e in batches:  # back in the texts' order
        states[rows, : s.shape[1]] = s
        tmask[rows, : m.shape[1]] = m.long()
        temb[rows] = e
    return states, tmask, temb


def mine_hard_negatives(rs: RerankSet, num: int, *, chunk: int = 512) -> torch.Tensor:
    """``[T, num]`` image rows: the images of each expression's negative group (its own
    image excluded) whose best instance the dual encoder scores highest; ``-1`` pads
    groups with fewer images.

    Each group's expressions are scored against that group's images alone: the demo's 62,000
    expressions against 2,600 images in groups of 400 cost 7.9 s scored against every image,
    most of it writing scores that the group mask then threw away."""
    out = torch.full((rs.num_texts, num), -1, dtype=torch.long)
    if num == 0 or rs.num_texts == 0:
        return out
    text_group = rs.groups[rs.text_image]
    local = torch.empty(rs.emb.shape[0], dtype=torch.long)  # an image row's place in its group
    for group in rs.groups.unique().tolist():
        rows = torch.nonzero(rs.groups == group).squeeze(1)
        texts = torch.nonzero(text_group == group).squeeze(1)
        if texts.numel() == 0:
            continue
        local[rows] = torch.arange(rows.numel())
        emb, mask, k = rs.emb[rows], rs.mask[rows], min(num, rows.numel())
        for start in range(0, texts.numel(), chunk):
            t = texts[start : start + chunk]
            best = torch.einsum("td,nkd->tnk", rs.text_emb[t], emb).masked_fill(~mask[None], -2.0).amax(dim=2)
            best[torch.arange(t.numel()), local[rs.text_image[t]]] = -3.0  # never its own image
            val, idx = best.topk(k, dim=1)
            picked = rows[idx]
            picked[val <= -3.0] = -1
            out[t, :k] = picked
    return out


def draw_negatives(pool: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, num]`` of each row's ``pool`` ``[B, P]`` (mined image rows, ``-1`` padding), drawn
    at random without replacement, real images before padding; ``pool`` itself when ``P <= num``."""
    if pool.shape[1] <= num:
        return pool
    keys = torch.rand(pool.shape, generator=generator) + 2.0 * (pool < 0)
    return pool.gather(1, keys.argsort(dim=1)[:, :num])


def candidate_logits(
    reranker: RelationReranker | torch.nn.Module,
    rs: RerankSet,
    text_idx: torch.Tensor,
    neg_images: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B, C * K]`` re-ranked logits of every instance of each expression's own image
    (slots ``0..K-1``, so the referent's column is ``positive``) and of its ``C - 1`` negative
    images (``-1`` = none: its instances are masked to ``-inf``).

    ``logit_scale`` / ``logit_bias``: the dual encoder's affine score, ``scale * cos + bias``.
    """
    imgs = torch.cat([rs.text_image[text_idx][:, None], neg_images], dim=1)  # [B, C]
    return image_logits(reranker, rs, rs.token_states[text_idx], rs.token_mask[text_idx], rs.text_emb[text_idx],
                        imgs, logit_scale, logit_bias, device=device)


def image_logits(
    reranker: RelationReranker | torch.nn.Module,
    rs: RerankSet,
    token_states: torch.Tensor,
    token_mask: torch.Tensor,
    text_emb: torch.Tensor,
    imgs: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B, C * K]`` re-ranked logits of every instance of the images ``imgs [B, C]`` (rows of
    ``rs``; ``-1`` = none: masked to ``-inf``) for the expressions ``token_states [B, L, H]``,
    ``token_mask [B, L]``, ``text_emb [B, D]``."""
    b, c = imgs.shape
    present = (imgs >= 0).reshape(-1).to(device)
    # Each distinct image once: expressions of one batch share many hard negatives.
    unique, rows = torch.unique(imgs.clamp(min=0).reshape(-1), return_inverse=True)
    emb = rs.emb[unique].to(device)
    rows = rows.to(device)
    base = logit_scale * torch.einsum("bd,bukd->buk", text_emb.to(device), emb[rows.view(b, c)]).reshape(b * c, -1)
    base = base + logit_bias
    length = max(1, int(token_mask.sum(dim=1).max()))  # trim padding shared by the whole batch
    # The re-ranker scores short and long instance sets apart (RelationReranker.forward).
    logits = reranker(
        token_states[:, :length].to(device), token_mask[:, :length].to(device), base, emb,
        rs.boxes[unique].to(device), rs.objectness[unique].to(device), rs.mask[unique].to(device),
        text_rows=torch.arange(b, device=device).repeat_interleave(c), image_rows=rows,
    )  # fmt: skip
    return logits.masked_fill(~present[:, None], float("-inf")).view(b, -1)


def rank_pool(
    reranker: RelationReranker | torch.nn.Module | None,
    rs: RerankSet,
    text: int,
    candidates: int,
    logit_scale: float,
    logit_bias: float,
) -> tuple[torch.Tensor, list[tuple[int, float, int]], list[tuple[int, float, int]]]:
    """What serving does for one expression of ``rs``, on an exact index: its top
    ``candidates`` instances by the dual encoder over every image of ``rs``, their images,
    and each image's best instance.

    Returns the top instances' flat indices (``image * K + slot``, best first), the pool's
    images in ANN order as ``(image, logit, best slot)`` by the dual encoder, and the same
    images re-ranked by ``reranker``, best first (the expression's own image is always
    scored and listed: callers keep the images their pool holds; without a re-ranker: the
    ANN list).
    """
    n, m, _ = rs.emb.shape
    with torch.no_grad():
        logits = logit_scale * torch.einsum("d,nkd->nk", rs.text_emb[text], rs.emb) + logit_bias
        logits = logits.masked_fill(~rs.mask, -1e9)
        top = logits.flatten().topk(min(candidates, n * m)).indices
        pool = list(dict.fromkeys((top // m).tolist()))
        best = logits[pool].max(dim=1)
        ann = [(i, float(v), int(k)) for i, v, k in zip(pool, best.values, best.indices)]
        if reranker is None:
            return top, ann, ann
        own = int(rs.text_image[text])
        negatives = torch.tensor([[i for i in pool if i != own] or [-1]])
        scored = candidate_logits(reranker, rs, torch.tensor([text]), negatives, logit_scale, logit_bias)[0]
        best = scored.view(-1, m).max(dim=1)
    rows = [own, *negatives[0].tolist()]
    ranked = [(img, float(v), int(k)) for img, v, k in zip(rows, best.values, best.indices) if img >= 0]
    return top, ann, sorted(ranked, key=lambda r: -r[1])


def calibration_split(text_image: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held)`` expression indices: the expressions of every ``every``-th image are
    held out of training to calibrate the presence threshold (whole images, so no wording of a
    held-out referent is trained on). ``every`` 0, or fewer than ``2 * every`` expressions:
    nothing is held out."""
    if every == 1:
        raise ValueError("every 1 would hold every expression out of training")
    n = int(text_image.numel())
    held = (text_image % every == every - 1) if every and n >= 2 * every else torch.zeros(n, dtype=torch.bool)
    return torch.nonzero(~held).squeeze(1), torch.nonzero(held).squeeze(1)


def sample_texts(rs: RerankSet, pool: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` expressions of ``pool``, all from one negative group (drawn in
    proportion to its share of ``pool``): their hard negatives come from the same images,
    so :func:`candidate_logits` projects far fewer distinct images per expression."""
    pick = int(pool[torch.randint(pool.numel(), (1,), generator=generator)])
    group = rs.groups[rs.text_image[pick]]
    same = pool[rs.groups[rs.text_image[pool]] == group]
    return same[torch.randint(same.numel(), (batch_size,), generator=generator)]


def rerank_loss(
    reranker: RelationReranker | torch.nn.Module,
    rs: RerankSet,
    text_idx: torch.Tensor,
    neg_images: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    bce_weight: float = 0.1,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Listwise loss for expressions ``text_idx [B]`` over their own image + ``neg_images [B, C-1]``.

    With referent slots: cross-entropy over every instance of those images (the referent
    is the target). Weak (``rs.weak``, multiple-instance): each image is a bag whose score
    is the log-sum-exp of its instances' logits, and the cross-entropy over the C images
    makes the own image win. The negatives are the images the dual encoder confuses with
    the own one, so they hold look-alikes of the referent (its colour, its shape, a landmark
    in the wrong place); an instance can only lift its own image above them by what sets
    the referent apart, which is how the re-ranker learns to localize without a box.
    Either way a sigmoid term (weight ``bce_weight``) over :func:`presence_scores` keeps the
    logits presence probabilities for discovery mode."""
    b = text_idx.numel()
    logits = candidate_logits(reranker, rs, text_idx, neg_images, logit_scale, logit_bias, device=device)
    scores, target = presence_scores(logits, rs, text_idx)
    ranked = torch.logsumexp(logits.view(b, -1, rs.emb.shape[1]), dim=2) if rs.weak else logits
    ce = F.cross_entropy(ranked, target)
    finite = torch.isfinite(scores)
    labels = F.one_hot(target, scores.shape[1]).to(scores.dtype)
    bce = F.binary_cross_entropy_with_logits(scores[finite], labels[finite], reduction="sum") / max(b, 1)
    acc = (ranked.argmax(dim=1) == target).float().mean()
    return {"loss": ce + bce_weight * bce, "loss_rerank_ce": ce, "loss_rerank_bce": bce, "rerank_acc": acc}


def presence_scores(logits: torch.Tensor, rs: RerankSet, text_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a presence decision reads, from :func:`candidate_logits` ``[B, C * K]``: every
    instance, with the referent's slot as the target; weak (``rs.weak``): each image's best
    instance ``[B, C]``, with the own image (column 0) as the target. Returns (scores, target ``[B]``)."""
    if rs.weak:
        b = text_idx.numel()
        return logits.view(b, -1, rs.emb.shape[1]).amax(dim=2), torch.zeros(b, dtype=torch.long, device=logits.device)
    return logits, rs.positive[text_idx].to(logits.device)


@torch.no_grad()
def calibrate_presence(
    reranker: RelationReranker | torch.nn.Module,
    rs: RerankSet,
    text_idx: torch.Tensor,
    neg_images: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The probability threshold that best separates referents from every other instance
    of their own and their hard-negative images (max F1), on held-out expressions.

    Weak (``rs.weak``, no referent slots): each image's best instance stands for the image,
    and the threshold separates the own images from the hard negatives.

    Returns ``{"discover_threshold", "precision", "recall", "f1", "num_texts"}``; serving
    reads ``discover_threshold`` (``calibration.json``) for presence decisions.
    """
    probs, labels = [], []
    for start in range(0, int(text_idx.numel()), 64):
        idx = text_idx[start : start + 64]
        logits = candidate_logits(reranker, rs, idx, neg_images[start : start + 64], logit_scale, logit_bias,
                                  device=device).float().cpu()
        scores, slot = presence_scores(logits, rs, idx)
        target = F.one_hot(slot, scores.shape[1]).bool()
        keep = torch.isfinite(scores)
        probs.append(torch.sigmoid(scores[keep]))
        labels.append(target[keep])
    p, y = torch.cat(probs), torch.cat(labels)
    if not bool(y.any()):
        return {"discover_threshold": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "num_texts": 0}
    return {**best_f1_threshold(p, y, int(y.sum())), "num_texts": int(text_idx.numel())}


def best_f1_threshold(probs: torch.Tensor, right: torch.Tensor, positives: int) -> dict[str, float]:
    """The threshold on ``probs`` whose answers (every ``prob`` at or above it; ``right``: which
    of them are correct) have the best F1 against ``positives`` things to find:
    ``{"discover_threshold", "precision", "recall", "f1"}``. It lies halfway between the last
    accepted and the first rejected probability."""
    order = torch.argsort(probs, descending=True)
    tp = torch.cumsum(right[order].float(), 0)
    precision = tp / torch.arange(1, len(order) + 1)
    recall = tp / max(positives, 1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-9)
    best = int(torch.argmax(f1))
    lo = float(probs[order][best + 1]) if best + 1 < len(order) else 0.0
    threshold = min(max((float(probs[order][best]) + lo) / 2, 1e-4), 1 - 1e-4)
    return {"discover_threshold": threshold, "precision": float(precision[best]), "recall": float(recall[best]),
            "f1": float(f1[best])}


# ------------------------------------------------------------------ discover mode's presence
#
# The ranking loss above contrasts one referent against everything else, which is not the
# decision discover mode makes: "does this image hold something the query describes?" for
# generic queries ("a little white thing") with many matching images, or none. Training
# discovery queries (``reir synth``: ``discovery.json`` entries with ``split: "train"`` and
# their negative ``group``) carry every match in their group, so every stored instance of
# the group's images gets a label: a multi-label sigmoid loss over the instances of matching
# and hard non-matching images, calibrated on held-out queries the way discover mode is
# scored (one answer per image, right when its best instance is a match).

DISCOVERY_OUT, DISCOVERY_IGNORE, DISCOVERY_NEG, DISCOVERY_POS = -2, -1, 0, 1


@dataclass
class DiscoverySet:
    """Training discovery queries over a :class:`RerankSet` (Q queries, its N images, K slots)."""

    token_states: torch.Tensor  # [Q, L, H]
    token_mask: torch.Tensor  # [Q, L]
    text_emb: torch.Tensor  # [Q, D]
    group: torch.Tensor  # [Q] long
    labels: torch.Tensor  # [Q, N, K] int8: DISCOVERY_* (OUT: not in the query's group, or no stored instance)
    truth: torch.Tensor  # [Q, N] bool: the image holds a match
    hard: torch.Tensor  # [Q, H] image rows without a match, dual encoder's best first (-1 pads)

    @property
    def num_queries(self) -> int:
        return int(self.group.numel())


def discovery_rows(queries: Sequence[Any], image_ids: Sequence[str],
                   groups: Sequence[int]) -> tuple[list[dict[str, Any]], dict[str, list[list[Any]]]]:  # fmt: skip
    """Training discovery queries (``DiscoveryQuery`` with ``split == "train"`` and a ``group``)
    for the images ``image_ids`` of negative groups ``groups``: ``([{"raw", "group"}], {image_id:
    [[query index, [x, y, w, h]], ...]})``. A query whose matches fall outside its group, or in
    no training image, is left out: its negatives would not be known."""
    group_of = dict(zip(image_ids, (int(g) for g in groups)))
    known = set(group_of.values())
    texts: list[dict[str, Any]] = []
    per_image: dict[str, list[list[Any]]] = {}
    for q in queries:
        if q.split != "train" or q.group not in known or any(group_of.get(str(m.image_id)) != q.group
                                                              for m in q.matches):  # fmt: skip
            continue
        k = len(texts)
        texts.append({"raw": q.raw, "group": int(q.group)})
        for m in q.matches:
            per_image.setdefault(str(m.image_id), []).append([k, [float(v) for v in m.bbox]])
    return texts, per_image


@torch.no_grad()
def build_discovery_set(
    model: ReirModel, processor: ReirProcessor, rs: RerankSet, queries: Sequence[dict[str, Any]],
    matches: Sequence[Sequence[Sequence[Any]]], sizes: Sequence[tuple[int, int]], *, min_iou: float = 0.5,
    ignore_iou: float = 0.25, hard: int = 64,
) -> DiscoverySet:
    """Labels of every stored instance of ``rs`` for the training discovery ``queries``
    (``[{"raw", "group"}]``); ``matches[row]`` lists ``[query index, xywh box]`` of image ``row``
    (``sizes[row]``: its width, height). A stored instance is a match when its box overlaps one
    by IoU >= ``min_iou``, ignored when it overlaps one by >= ``ignore_iou`` (neither label
    is sure), a non-match otherwise; images of other groups are out of the query's scope."""
    q, (n, k) = len(queries), rs.mask.shape
    group = torch.tensor([int(x["group"]) for x in queries], dtype=torch.long)
    scope = (group[:, None] == rs.groups[None, :])  # [Q, N]
    labels = torch.full((q, n, k), DISCOVERY_OUT, dtype=torch.int8)
    labels[scope[:, :, None] & rs.mask[None]] = DISCOVERY_NEG
    truth = torch.zeros(q, n, dtype=torch.bool)
    for row, found in enumerate(matches):
        for qi, box in found:
            if not bool(scope[qi, row]):
                continue
            truth[qi, row] = True
            gt = _cxcywh_norm([box], *sizes[row])
            iou = (pairwise_iou_xyxy(cxcywh_to_xyxy(gt), cxcywh_to_xyxy(rs.boxes[row]))[0] * rs.mask[row][None])[0]
            here = labels[qi, row]
            here[(iou >= ignore_iou) & (here == DISCOVERY_NEG)] = DISCOVERY_IGNORE
            here[iou >= min_iou] = DISCOVERY_POS
    token_states, token_mask, text_emb = encode_texts(model, processor, [x["raw"] for x in queries])
    best = torch.einsum("qd,nkd->qnk", text_emb, rs.emb).masked_fill(~rs.mask[None], -2.0).amax(dim=2)
    best = best.masked_fill(~scope | truth, -3.0)
    val, idx = best.topk(min(hard, n), dim=1)
    idx[val <= -3.0] = -1
    return DiscoverySet(token_states, token_mask, text_emb, group, labels, truth, idx)


def sample_discovery(ds: DiscoverySet, pool: torch.Tensor, batch_size: int, images: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``batch_size`` queries of ``pool`` (one group, as :func:`sample_texts`) and ``[B, images]``
    image rows each: up to half matching images, the rest drawn from its hard non-matching
    images (``-1`` pads)."""
    pick = int(pool[torch.randint(pool.numel(), (1,), generator=generator)])
    same = pool[ds.group[pool] == ds.group[pick]]
    idx = same[torch.randint(same.numel(), (batch_size,), generator=generator)]
    out = torch.full((batch_size, images), -1, dtype=torch.long)
    for b, qi in enumerate(idx.tolist()):
        pos = torch.nonzero(ds.truth[qi]).squeeze(1)
        pos = pos[torch.randperm(pos.numel(), generator=generator)[: images // 2]]
        neg = ds.hard[qi][ds.hard[qi] >= 0]
        neg = neg[torch.randperm(neg.numel(), generator=generator)[: images - pos.numel()]]
        rows = torch.cat([pos, neg])
        out[b, : rows.numel()] = rows
    return idx, out


def discovery_loss(
    reranker: RelationReranker | torch.nn.Module, rs: RerankSet, ds: DiscoverySet, query_idx: torch.Tensor,
    imgs: torch.Tensor, logit_scale: float, logit_bias: float, *, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Sigmoid loss of every labelled instance of ``imgs [B, C]`` (mean), plus the listwise
    term that the matches, together, outrank the other instances (queries with a match)."""
    logits = image_logits(reranker, rs, ds.token_states[query_idx], ds.token_mask[query_idx], ds.text_emb[query_idx],
                          imgs, logit_scale, logit_bias, device=device)  # fmt: skip
    labels = ds.labels[query_idx[:, None], imgs.clamp(min=0)].masked_fill((imgs < 0)[:, :, None], DISCOVERY_OUT)
    labels = labels.reshape(logits.shape).to(logits.device)
    valid = (labels >= DISCOVERY_NEG) & torch.isfinite(logits)
    bce = F.binary_cross_entropy_with_logits(logits[valid], (labels[valid] == DISCOVERY_POS).to(logits.dtype))
    pos = (labels == DISCOVERY_POS) & valid
    has = pos.any(dim=1)
    if bool(has.any()):
        everything = logits.masked_fill(~valid, float("-inf"))
        listwise = (torch.logsumexp(everything[has], 1) - torch.logsumexp(everything[has].masked_fill(~pos[has],
                    float("-inf")), 1)).mean()  # fmt: skip
    else:
        listwise = logits.new_zeros(())
    return {"loss": bce + listwise, "loss_discovery_bce": bce, "loss_discovery_listwise": listwise}


@torch.no_grad()
def calibrate_discovery(
    reranker: RelationReranker | torch.nn.Module, rs: RerankSet, ds: DiscoverySet, query_idx: torch.Tensor,
    logit_scale: float, logit_bias: float, *, device: torch.device | str = "cpu", chunk: int = 64,
    none_target: float = 0.0,
) -> dict[str, float]:
    """Discover mode's presence threshold and query-level gate, calibrated on held-out queries
    ``query_idx``: each query scores every image of its group and answers each image whose best
    instance reaches the threshold (right when that instance is a match: the metric of
    ``reir.evaluation.discovery``). The threshold has the best F1; the gate (a query whose best
    image is under it answers nothing) then has the best joint score among the gates whose
    none-accuracy reaches ``none_target`` (:func:`reir.evaluation.discovery.gate_for`); the figures
    are :func:`reir.evaluation.discovery.tally`'s. Returns ``{"discover_threshold", "discover_gate",
    "precision", "recall", "f1", "none_accuracy", "joint", "none_accuracy_without_gate",
    "none_target", "num_queries"}`` (the figures with the gate)."""
    judged: list[Judged] = []
    for qi in query_idx.tolist():
        rows = torch.nonzero(ds.group[qi] == rs.groups).squeeze(1)
        answers: list[tuple[float, Any, bool]] = []  # (probability, image row, right): one per image
        for lo in range(0, rows.numel(), chunk):
            part = rows[lo : lo + chunk][None]
            logits = image_logits(reranker, rs, ds.token_states[qi : qi + 1], ds.token_mask[qi : qi + 1],
                                  ds.text_emb[qi : qi + 1], part, logit_scale, logit_bias,
                                  device=device).float().cpu().view(part.shape[1], -1)  # fmt: skip
            value, slot = logits.max(dim=1)
            keep = torch.isfinite(value)
            right = ds.labels[qi, part[0], slot] == DISCOVERY_POS
            answers += zip(torch.sigmoid(value[keep]).tolist(), part[0][keep].tolist(), right[keep].tolist(), strict=True)
        judged.append(Judged(answers, int(ds.truth[qi, rows].sum())))
    truth_images = sum(j.truth_images for j in judged)
    if not judged or truth_images == 0:
        return {"discover_threshold": 0.5, "discover_gate": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                "none_accuracy": 0.0, "none_accuracy_without_gate": 0.0, "joint": 0.0, "none_target": float(none_target),
                "num_queries": int(query_idx.numel())}  # fmt: skip
    threshold = best_f1_threshold(torch.tensor([a[0] for j in judged for a in j.answers]),
                                  torch.tensor([a[2] for j in judged for a in j.answers], dtype=torch.bool),
                                  truth_images)["discover_threshold"]  # fmt: skip
    gate = gate_for(judged, threshold, none_target=none_target)
    at = tally(judged, threshold, gate)
    return {**{k: at[k] for k in ("precision", "recall", "f1", "none_accuracy", "joint")},
            "discover_threshold": threshold, "discover_gate": gate,
            "none_accuracy_without_gate": tally(judged, threshold)["none_accuracy"],
            "none_target": float(none_target), "num_queries": int(query_idx.numel())}  # fmt: skip
