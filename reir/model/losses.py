"""Training losses: DETR-style detection over dense queries, within-image REC (stage 1)
and cross-batch CLIA sigmoid contrast (stage 2), plus the MoRE load-balancing loss.
Stage ``"weak"`` (no referent boxes) lives in :mod:`reir.model.losses_weak`.

All boxes here are normalized ``cxcywh``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from .boxes import cxcywh_to_xyxy, generalized_iou_xyxy, region_means
from .configuration import LossSpec, ReirConfig
from .losses_weak import weak_contrastive_loss
from .modeling import InstanceOutput, ReirOutput, score_from_similarity
from .processing import TrainBatch


@torch.no_grad()
def hungarian_match(
    pred_boxes: torch.Tensor,
    pred_logits: torch.Tensor,
    gt_boxes: torch.Tensor,
    *,
    w_obj: float = 2.0,
    w_l1: float = 5.0,
    w_giou: float = 2.0,
) -> torch.Tensor:
    """One-to-one assignment of ``n`` GT boxes ``[n,4]`` to ``Q`` predictions ``[Q,4]``/``[Q]``.

    Cost = ``w_obj * (-p_obj) + w_l1 * L1 + w_giou * (-GIoU)``. Returns ``[n]`` long: the
    query index matched to each GT box (requires ``Q >= n``).
    """
    n = gt_boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=pred_boxes.device)
    if pred_boxes.shape[0] < n:
        raise ValueError(f"{n} GT boxes but only {pred_boxes.shape[0]} queries")
    prob = pred_logits.float().sigmoid()
    cost_l1 = torch.cdist(pred_boxes.float(), gt_boxes.float(), p=1)
    giou = generalized_iou_xyxy(cxcywh_to_xyxy(pred_boxes.float()), cxcywh_to_xyxy(gt_boxes.float()))
    cost = w_l1 * cost_l1 - w_giou * giou - w_obj * prob[:, None]
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    match = torch.empty(n, dtype=torch.long)
    match[torch.as_tensor(cols)] = torch.as_tensor(rows, dtype=torch.long)
    return match.to(pred_boxes.device)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Summed focal loss: down-weights the many easy negative queries (Q >> objects)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


def siglip_pair_loss(logits: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP sigmoid loss over all pairs, normalized by the number of rows (texts).

    ``logits [T, N]``, ``positives [T, N]`` bool (+1 label), ``valid [N]`` bool masks columns
    that are padding (uneven batches across workers).
    """
    labels = positives.to(logits.dtype) * 2 - 1
    loss = -F.logsigmoid(labels * logits)
    if valid is not None:
        loss = loss * valid.to(logits.dtype)[None, :]
    return loss.sum() / max(logits.shape[0], 1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The autograd all_gather's gloo backward scatters into ``empty_like`` buffers of the
    incoming gradients; a strided gradient (an einsum's backward gives one) then arrives
    scrambled on the other ranks.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _gather_instances(emb: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather ``[B, Q, D]`` from every worker with gradient; pads uneven B.

    Returns (``[W * Bmax, Q, D]``, valid ``[W * Bmax]`` bool, Bmax).
    """
    import warnings

    from torch.distributed.nn.functional import all_gather

    b = torch.tensor([emb.shape[0]], device=emb.device)
    sizes = [torch.zeros_like(b) for _ in range(world_size)]
    dist.all_gather(sizes, b)
    b_max = int(torch.stack(sizes).max())
    padded = F.pad(emb, (0, 0, 0, 0, 0, b_max - emb.shape[0]))
    with warnings.catch_warnings():
        # Deprecated in favour of a private API; it remains the public autograd-aware gather.
        warnings.simplefilter("ignore", FutureWarning)
        gathered = _ContiguousGrad.apply(torch.cat(all_gather(padded), dim=0))
    valid = torch.cat([torch.arange(b_max, device=emb.device) < int(s) for s in sizes])
    return gathered, valid, b_max


def _gather_padded(x: torch.Tensor, world_size: int, pad: int) -> torch.Tensor:
    """All-gather a 1-D long tensor of uneven length (no gradient), padding with ``pad``."""
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    n_max = int(torch.stack(sizes).max())
    padded = F.pad(x, (0, n_max - x.numel()), value=pad)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)


def text_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[T]`` long identity of each expression's tokens (equal texts get equal keys).

    Python's hash of an int tuple is not salted, so keys agree across workers.
    """
    # Plain lists: a tensor index per row cost ~200 small ops a stage-2 step.
    rows = [tuple(i for i, m in zip(ids, mask) if m)
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
    return torch.tensor([hash(r) for r in rows], dtype=torch.long, device=input_ids.device)


def shared_positives(keys: torch.Tensor, all_keys: torch.Tensor, all_cols: torch.Tensor, *,
                     num_columns: int) -> torch.Tensor:
    """``[T, num_columns]`` bool: text ``t``'s positives are the referent columns of every
    expression of the global batch with the same key (``text_keys``), its own included;
    ``all_cols`` ``-1`` marks padding rows of the gather."""
    same = (keys[:, None] == all_keys[None, :]) & (all_cols[None, :] >= 0)
    rows, idx = same.nonzero(as_tuple=True)
    positives = torch.zeros(keys.shape[0], num_columns, dtype=torch.bool, device=keys.device)
    positives[rows, all_cols[idx]] = True
    return positives


def _matched_cross_entropy(
    logits: torch.Tensor, matches: list[torch.Tensor], labels: list[torch.Tensor], field: str
) -> torch.Tensor:
    """Cross-entropy of the matched queries' ``logits [B, Q, K]`` (``matches[b][i]``: the query
    of image b's box i) against ``labels[b][i]``; -1 is no label. 0 (in the graph) without any
    label; a label ``>= K`` is refused, naming ``vision.<field>``."""
    pred = torch.cat([logits[b, m] for b, m in enumerate(matches)])
    target = torch.cat([lab.long() for lab in labels]).to(pred.device)
    if target.numel() and int(target.max()) >= logits.shape[-1]:
        raise ValueError(f"label {int(target.max())} >= vision.{field}={logits.shape[-1]}: raise {field}")
    if not bool((target >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(pred.float(), target, ignore_index=-1)


def as_float(value: Any) -> Any:
    """``value`` with every floating tensor in it (dataclasses, named tuples, lists, dicts)
    cast to fp32; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: as_float(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})  # fmt: skip
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(as_float(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(as_float(v) for v in value)
    if isinstance(value, dict):
        return {k: as_float(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class _Similarities:
    """Cosine similarities ``[T, N]`` of a worker's expressions with the instance queries of its
    batch (``world_size`` 1) or of the global batch, all-gathered (padded to ``Bmax`` images a
    worker, ``valid`` marking the real columns); this worker's images start at ``offset``."""

    values: torch.Tensor
    q: int
    offset: int = 0
    valid: torch.Tensor | None = None

    @classmethod
    def of(cls, text_emb: torch.Tensor, emb: torch.Tensor, rank: int, world_size: int) -> _Similarities:
        q, valid, offset = emb.shape[1], None, 0
        if world_size > 1:
            emb, valid_img, b_max = _gather_instances(emb, world_size)
            valid, offset = valid_img.repeat_interleave(q), rank * b_max * q
        return cls(text_emb @ emb.reshape(-1, emb.shape[-1]).t(), q, offset, valid)

    def column(self, image: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Column of query ``query`` of this worker's image ``image`` (broadcasting)."""
        return self.offset + image * self.q + query


class ReirCriterion(nn.Module):
    """Losses of training stage ``"1"`` (detection + REC), ``"2"`` (adds CLIA) or
    ``"weak"`` (detection + MIL contrast; never reads referent boxes).

    ``criterion(model, batch)`` runs ``model(...)`` (so DDP/DeepSpeed wrappers work) and
    returns ``{"loss": total, "loss_obj", "loss_l1", "loss_giou", "loss_cls", "loss_app",
    "loss_rec", "loss_clia", "loss_aux"}`` (parts unweighted, total weighted by ``config.loss``);
    stage ``"weak"`` adds ``"loss_weak"``, ``"loss_weak_within"`` and ``"weak_suppressed"`` (a diagnostic: the
    fraction of negative pairs suppressed as likely false negatives).
    """

    def __init__(self, config: ReirConfig, *, stage: str, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if str(stage) not in ("1", "2", "weak"):
            raise ValueError(f"stage must be '1', '2' or 'weak', got {stage!r}")
        self.stage = str(stage)
        self.spec: LossSpec = config.loss_spec
        self.rank, self.world_size = rank, world_size

    def forward(self, model: nn.Module, batch: TrainBatch) -> dict[str, torch.Tensor]:
        out: ReirOutput = model(
            pixel_values=batch.pixel_values, input_ids=batch.input_ids, attention_mask=batch.attention_mask
        )
        device = batch.pixel_values.device.type
        if torch.is_autocast_enabled(device):
            # The forward ran under autocast (reir.training.precision): the losses read fp32
            # outputs and compute in fp32 (similarities, matching costs, sigmoid and softmax terms).
            with torch.autocast(device, enabled=False):
                return self._losses(as_float(out), batch)
        return self._losses(out, batch)

    def _losses(self, out: ReirOutput, batch: TrainBatch) -> dict[str, torch.Tensor]:
        assert out.instances is not None and out.text is not None
        if self.stage == "weak":
            return self._weak(out, batch)
        inst = out.instances
        matches = [self._match(inst, b, t["boxes"]) for b, t in enumerate(batch.targets)]
        parts = self._detection(inst, batch, matches)
        text_emb = out.text.embeddings
        query = self._referent_queries(batch, matches)
        # One product of the expressions with the instances serves both REC (each expression's
        # own image's block) and CLIA (every column); stage 2 gathers the global batch's.
        sims = _Similarities.of(text_emb, inst.embeddings, self.rank, self.world_size if self.stage == "2" else 1)
        parts["loss_rec"] = self._rec(sims, batch.text_image_index, query, out)
        zero = torch.zeros((), device=text_emb.device)
        parts["loss_clia"] = self._clia(sims, batch, query, out) if self.stage == "2" else zero
        parts["loss_aux"] = out.text.aux_loss
        s = self.spec
        w_rec = s.w_rec if self.stage == "1" else s.w_rec_stage2
        parts["loss"] = (
            self._weighted_detection(parts)
            + w_rec * parts["loss_rec"]
            + s.w_clia * parts["loss_clia"]
            + s.w_aux * parts["loss_aux"]
        )
        return parts

    def _weak(self, out: ReirOutput, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Stage "weak": ``text_target_index`` is never read. The images' own boxes (not
        linked to any expression) train detection when ``weak_detection`` is on; otherwise
        the detection heads only join the graph with weight 0 (every rank's DeepSpeed
        engine then sees the same parameters take part). The within-image competition
        (``w_weak_within``) runs over the queries matched to those boxes, so without
        detection it is 0."""
        assert out.instances is not None and out.text is not None
        inst, s = out.instances, self.spec
        matched = None
        if s.weak_detection:
            matches = [self._match(inst, b, t["boxes"]) for b, t in enumerate(batch.targets)]
            parts = self._detection(inst, batch, matches)
            matched = torch.zeros(inst.objectness_logits.shape, dtype=torch.bool, device=inst.objectness_logits.device)
            for b, m in enumerate(matches):
                matched[b, m] = True
        else:
            unused = inst.boxes.sum() * 0.0 + inst.objectness_logits.sum() * 0.0
            for head in (inst.class_logits, inst.appearance):
                if head is not None:
                    unused = unused + head.sum() * 0.0
            if inst.probes is not None:
                unused = unused + sum(p.sum() * 0.0 for p in inst.probes if p is not None)
            parts = {k: unused for k in ("loss_obj", "loss_l1", "loss_giou", "loss_cls", "loss_app", "loss_probe")}
        text_emb = out.text.embeddings
        parts.update(weak_contrastive_loss(
            text_emb, batch.text_image_index, inst.embeddings, inst.objectness_logits, out.logit_scale,
            out.logit_bias, s, rank=self.rank, world_size=self.world_size, matched=matched,
        ))  # fmt: skip
        zero = torch.zeros((), device=text_emb.device)
        parts["loss_rec"], parts["loss_clia"], parts["loss_aux"] = zero, zero, out.text.aux_loss
        parts["loss"] = (
            self._weighted_detection(parts)
            + s.w_weak * parts["loss_weak"]
            + s.w_weak_within * parts["loss_weak_within"]
            + s.w_aux * parts["loss_aux"]
        )
        return parts

    def _weighted_detection(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The detection parts of the total (every stage): objectness, box, class, appearance."""
        s = self.spec
        return (s.w_obj * parts["loss_obj"] + s.w_l1 * parts["loss_l1"] + s.w_giou * parts["loss_giou"]
                + s.w_cls * parts["loss_cls"] + s.w_appearance * parts["loss_app"] + s.w_probe * parts["loss_probe"])

    def _match(self, inst: InstanceOutput, b: int, gt: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return hungarian_match(
            inst.boxes[b].detach(), inst.objectness_logits[b].detach(), gt,
            w_obj=s.match_obj, w_l1=s.match_l1, w_giou=s.match_giou,
        )  # fmt: skip

    def _detection(
        self, inst: InstanceOutput, batch: TrainBatch, matches: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # Normalize by the number of GT boxes (DETR): a batch of crowded images should
        # not get a larger step than one of sparse images.
        num_boxes = max(sum(int(m.numel()) for m in matches), 1)
        target_obj = torch.zeros_like(inst.objectness_logits)
        for b, m in enumerate(matches):
            target_obj[b, m] = 1.0
        loss_obj = sigmoid_focal_loss(inst.objectness_logits, target_obj, self.spec.focal_alpha, self.spec.focal_gamma)
        pred = torch.cat([inst.boxes[b, m] for b, m in enumerate(matches)])
        gt = torch.cat([t["boxes"].to(pred.dtype) for t in batch.targets])
        loss_l1 = F.l1_loss(pred, gt, reduction="sum")
        loss_giou = (1 - torch.diag(generalized_iou_xyxy(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)))).sum()
        return {"loss_obj": loss_obj / num_boxes, "loss_l1": loss_l1 / num_boxes, "loss_giou": loss_giou / num_boxes,
                "loss_cls": self._classification(inst, batch, matches),
                "loss_app": self._appearance(inst, batch, matches),
                "loss_probe": self._probes(inst, batch, matches)}

    @classmethod
    def _probes(cls, inst: InstanceOutput, batch: TrainBatch, matches: list[torch.Tensor]) -> torch.Tensor:
        """The embedding probes (``vision.embedding_probes``): the class and the appearance
        losses again, read from the matched queries' embeddings, and the image's scene label
        (``vision.num_scene_classes``); 0 without them."""
        if inst.probes is None:
            return torch.zeros((), device=inst.boxes.device)
        probes = inst.probes
        read = InstanceOutput(inst.boxes, inst.objectness_logits, inst.embeddings, probes.class_logits,
                              probes.appearance)
        loss = cls._classification(read, batch, matches) + cls._appearance(read, batch, matches)
        if probes.scene_logits is not None:  # every box of an image has the image's scene label
            scenes = [t["scene"].expand(t["labels"].shape[0]) for t in batch.targets]
            loss = loss + _matched_cross_entropy(probes.scene_logits, matches, scenes, "num_scene_classes")
        return loss

    @staticmethod
    def _appearance(inst: InstanceOutput, batch: TrainBatch, matches: list[torch.Tensor]) -> torch.Tensor:
        """Smooth L1 of the matched queries' predicted colour against the mean pixel of the
        centre of their boxes (:func:`reir.model.boxes.region_means`); 0 without the head.
        The target comes from the pixels alone, so weak data (boxes, no words) has it."""
        if inst.appearance is None:
            return torch.zeros((), device=inst.boxes.device)
        pred = torch.cat([inst.appearance[b, m] for b, m in enumerate(matches)])
        if pred.shape[0] == 0:
            return inst.appearance.sum() * 0.0
        target = torch.cat([region_means(batch.pixel_values[b], t["boxes"]) for b, t in enumerate(batch.targets)])
        return F.smooth_l1_loss(pred.float(), target.to(pred.device), beta=0.1)

    @staticmethod
    def _classification(inst: InstanceOutput, batch: TrainBatch, matches: list[torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the matched queries' class logits against their boxes' labels."""
        if inst.class_logits is None:
            return torch.zeros((), device=inst.boxes.device)
        return _matched_cross_entropy(inst.class_logits, matches, [t["labels"] for t in batch.targets], "num_classes")

    @staticmethod
    def _referent_queries(batch: TrainBatch, matches: list[torch.Tensor]) -> torch.Tensor:
        """``[T]`` long: the query matched to each expression's referent."""
        if batch.text_image_index.numel() == 0:
            return batch.text_image_index.clone()
        missing = torch.nonzero(batch.text_target_index < 0).flatten().tolist()
        if missing:
            k = missing[0]
            image = batch.image_ids[int(batch.text_image_index[k])] if batch.image_ids else int(batch.text_image_index[k])
            text = batch.texts[k] if batch.texts else k
            raise ValueError(f"expression {text!r} of image {image!r} has no referent box (a weak row, index -1): "
                             "stages 1 and 2 need the box; train such rows with stage 'weak'")
        return torch.stack(
            [matches[int(i)][int(j)] for i, j in zip(batch.text_image_index, batch.text_target_index)]
        )

    @staticmethod
    def _rec(sims: _Similarities, image_index: torch.Tensor, query: torch.Tensor, out: ReirOutput) -> torch.Tensor:
        """Cross-entropy of each expression over the Q queries of its own image: its image's
        block of the shared product. (Gathering the image's queries per expression first,
        ``embeddings[image_index]`` ``[T, Q, D]``, and its backward's outer products and scatter
        cost 15-25 ms more of a 0.45-0.5 s stage-2 step on 2 CPU cores, T 192, Q 256, timed.)"""
        if sims.values.shape[0] == 0:
            return sims.values.sum() * 0.0
        own = sims.column(image_index[:, None], torch.arange(sims.q, device=image_index.device))
        logits = score_from_similarity(sims.values.gather(1, own), out.logit_scale, out.logit_bias)
        return F.cross_entropy(logits, query)

    def _clia(self, sims: _Similarities, batch: TrainBatch, query: torch.Tensor, out: ReirOutput) -> torch.Tensor:
        """SigLIP loss of local expressions vs every instance query of the global batch.

        Only instances are gathered: each worker scores its own texts against all
        instances, so every (text, instance) pair of the global batch is counted exactly
        once, and all_gather's backward routes gradients to the instances' owners.
        An identical expression elsewhere in the global batch makes its referent a
        positive too (rather than a false negative).
        """
        logits = score_from_similarity(sims.values, out.logit_scale, out.logit_bias)
        cols = sims.column(batch.text_image_index, query)  # global column of each referent
        keys = text_keys(batch.input_ids, batch.attention_mask)
        all_keys, all_cols = keys, cols
        if self.world_size > 1:
            all_keys = _gather_padded(keys, self.world_size, pad=0)
            all_cols = _gather_padded(cols, self.world_size, pad=-1)
        positives = shared_positives(keys, all_keys, all_cols, num_columns=logits.shape[1])
        return siglip_pair_loss(logits, positives, sims.valid)
