"""Stage "weak": MIL pooling, false-negative suppression, and no referent box anywhere."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from reir.model import ReirCriterion, ReirModel, ReirProcessor
from reir.model.configuration import LossSpec
from reir.model.losses_weak import suppressed_negatives, weak_contrastive_loss, within_image_loss
from reir.model.modeling import score_from_similarity
from reir.model.processing import NO_REFERENT

from .synthetic import make_dataset

D, Q = 8, 4
SCALE, BIAS = torch.log(torch.tensor([10.0])), torch.tensor([-5.0])  # logits in [-15, 5]


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def _axis(i: int, d: int = D) -> list[float]:
    return [1.0 if k == i else 0.0 for k in range(d)]


def _grad_rows(text: torch.Tensor, text_image: torch.Tensor, inst: torch.Tensor, obj: torch.Tensor,
               spec: LossSpec) -> torch.Tensor:  # fmt: skip
    inst = inst.clone().requires_grad_(True)
    weak_contrastive_loss(text, text_image, inst, obj, SCALE, BIAS, spec)["loss_weak"].backward()
    assert inst.grad is not None
    return inst.grad


def test_mil_gradient_goes_to_the_instance_that_matches_the_expression() -> None:
    # Image 0 holds the referent (axis 0) at query 2, among three unrelated objects; a
    # background query (objectness ~0) looks like the referent too. Images 1, 2: other things.
    text = _unit(_axis(0))
    inst = torch.stack([
        _unit(_axis(1), _axis(2), [0.9, 0.1, 0, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0, 0, 0]),
        _unit(_axis(3), _axis(4), _axis(5), _axis(6)),
        _unit(_axis(7), _axis(1), _axis(2), _axis(3)),
    ])  # fmt: skip
    obj = torch.tensor([[3.0, 3.0, 3.0, -8.0], [3.0] * 4, [3.0] * 4])
    grad = _grad_rows(text, torch.tensor([0]), inst, obj, LossSpec())
    norms = grad[0].norm(dim=-1)
    assert norms[2] > 20 * norms[[0, 1, 3]].max(), norms
    assert float(grad[0, 2] @ text[0]) < 0  # a descent step raises the referent's score
    # Negative images: their best match is pushed away (gradient along +text).
    assert float(grad[1].sum(0) @ text[0]) > 0 and float(grad[2].sum(0) @ text[0]) > 0


def test_a_duplicate_expression_on_another_image_is_suppressed_not_pushed_away() -> None:
    # "the red square" said about image 0 and image 1, both of which hold one.
    text = _unit(_axis(0), _axis(0), _axis(5))
    inst = torch.stack([
        _unit([0.95, 0.3, 0, 0, 0, 0, 0, 0], _axis(2), _axis(3), _axis(4)),
        _unit([0.95, 0, 0.3, 0, 0, 0, 0, 0], _axis(6), _axis(7), _axis(3)),
        _unit(_axis(5), _axis(6), _axis(1), _axis(2)),
    ])  # fmt: skip
    obj = torch.full((3, Q), 3.0)
    images = torch.tensor([0, 1, 2])
    on = _grad_rows(text, images, inst, obj, LossSpec())
    off = _grad_rows(text, images, inst, obj, LossSpec(weak_text_threshold=2.0, weak_instance_threshold=2.0))
    # Image 1's red square: its own expression pulls it, the duplicate on image 0 no longer pushes.
    assert float(on[1, 0] @ text[0]) < 0
    assert float(off[1, 0] @ text[0]) > 0  # without suppression the duplicate wins: pushed away
    out = weak_contrastive_loss(text, images, inst, obj, SCALE, BIAS, LossSpec())
    assert out["weak_suppressed"].item() == pytest.approx(2 / 6)  # (0, 1) and (1, 0) of 6 negatives


def test_the_same_best_instance_in_another_image_suppresses_the_pair() -> None:
    # Different words, but image 1's best candidate for expression 0 is the very instance
    # that expression 0 picks in its own image (the same object, seen twice).
    text = _unit(_axis(0), _axis(4), _axis(6))
    inst = torch.stack([
        _unit([0.9, 0.2, 0.2, 0, 0, 0, 0, 0], _axis(3), _axis(4), _axis(5)),
        _unit(_axis(7), [0.9, 0.2, 0.2, 0, 0, 0, 0, 0], _axis(4), _axis(2)),
        _unit(_axis(6), _axis(5), _axis(1), _axis(3)),
    ])  # fmt: skip
    weight = torch.ones(3, Q)
    logits = torch.einsum("td,nqd->tnq", text, inst)
    best = logits.argmax(dim=-1)
    own = torch.tensor([0, 1, 2])
    mask = suppressed_negatives(text, own, text, own, inst, weight, best, text_threshold=0.9, instance_threshold=0.95)
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    strict = suppressed_negatives(text, own, text, own, inst, weight, best, text_threshold=0.9,
                                  instance_threshold=1.5)  # fmt: skip
    assert not strict.any()


def test_a_collapsed_model_cannot_suppress_its_way_to_a_zero_loss() -> None:
    # Every expression one vector, every instance one vector: each test calls every negative
    # a duplicate. Uncapped, the loss keeps only positives and a high score makes it ~0.
    n = 16
    text = _unit(*[_axis(0)] * n)
    inst = _unit(*[_axis(0)] * Q).expand(n, Q, -1).contiguous()
    obj = torch.full((n, Q), 3.0)
    images = torch.arange(n)
    uncapped = weak_contrastive_loss(text, images, inst, obj, SCALE, torch.tensor([5.0]),
                                     LossSpec(weak_max_suppressed=1.0))  # fmt: skip
    capped = weak_contrastive_loss(text, images, inst, obj, SCALE, torch.tensor([5.0]), LossSpec())
    assert uncapped["weak_suppressed"].item() == 1.0 and uncapped["loss_weak"].item() < 0.1
    assert capped["weak_suppressed"].item() == pytest.approx(3 / 15)  # ceil(0.2 * 15) of 15 negatives
    assert capped["loss_weak"].item() > 50  # the 12 kept negatives, all scored as matches


def _picks(text: torch.Tensor, inst: torch.Tensor) -> list[int]:
    return (text @ inst.t()).argmax(dim=1).tolist()


def _fit_texts(inst: torch.Tensor, start: torch.Tensor, within: float, steps: int = 60) -> torch.Tensor:
    """Gradient steps on free text embeddings of image 0 (a red and a blue circle); image 1,
    the negative, holds a red and a blue circle as well, so the cross-image contrast has
    nothing to tell the colours by."""
    text = start.clone().requires_grad_(True)
    images = inst.expand(2, -1, -1).contiguous()
    obj = torch.full((2, inst.shape[0]), 3.0)
    matched = torch.tensor([[True, True, False, False]] * 2)  # the two circles carry annotated boxes
    spec = LossSpec(w_weak_within=within)
    opt = torch.optim.SGD([text], lr=0.5)
    for _ in range(steps):
        out = weak_contrastive_loss(F.normalize(text, dim=-1), torch.tensor([0, 0]), images, obj, SCALE, BIAS, spec,
                                    matched=matched)  # fmt: skip
        loss = out["loss_weak"] + within * out["loss_weak_within"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.normalize(text.detach(), dim=-1)


def test_expressions_of_one_image_compete_for_its_candidates() -> None:
    # Candidates: red circle, blue circle, two background slots far from both. Both
    # expressions start out as "a circle, a bit red": both pick the red circle.
    inst = _unit([1, 0, 1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0], _axis(5), _axis(6))
    start = _unit([0.2, 0, 1, 0, 0, 0, 0, 0], [0.2, 0.05, 1, 0, 0, 0, 0, 0])  # "red circle", "blue circle"
    assert _picks(start, inst) == [0, 0]
    assert _picks(_fit_texts(inst, start, within=0.0), inst) == [0, 0]  # the contrast alone: no reason to move
    assert _picks(_fit_texts(inst, start, within=1.0), inst) == [0, 1]  # competition: each its own object


def test_only_distinct_expressions_of_the_same_image_compete() -> None:
    inst = _unit(_axis(0), _axis(1), _axis(2), _axis(3))
    obj = torch.full((4,), 3.0)
    logits = score_from_similarity(_unit(_axis(0), _axis(0), _axis(1)) @ inst.t(), SCALE, BIAS)
    text = _unit(_axis(0), _axis(0), _axis(1))
    kw = {"temperature": 1.0, "objectness_weight": 1.0, "text_threshold": 0.999}
    # Alone in its image, or beside its own duplicate only: nothing to compete with.
    assert within_image_loss(logits[:2], obj.expand(2, -1), torch.tensor([0, 0]), text[:2], **kw).item() == 0.0
    assert within_image_loss(logits, obj.expand(3, -1), torch.tensor([0, 1, 2]), text, **kw).item() == 0.0
    # Beside a distinct expression that picks another object: a small loss; beside one
    # that picks the same object: large.
    apart = within_image_loss(logits, obj.expand(3, -1), torch.tensor([0, 0, 0]), text, **kw).item()
    same = score_from_similarity(_unit(_axis(0), _axis(0), [1, 0.1, 0, 0, 0, 0, 0, 0]) @ inst.t(), SCALE, BIAS)
    clash = within_image_loss(same, obj.expand(3, -1), torch.tensor([0, 0, 0]),
                              _unit(_axis(0), _axis(0), [1, 0.1, 0, 0, 0, 0, 0, 0]), **kw).item()  # fmt: skip
    assert 0 < apart < 0.01 and clash > 0.5, (apart, clash)


def test_only_queries_matched_to_annotated_boxes_compete() -> None:
    # Query 3 is a background slot that fits "red" best; it is not matched to a box.
    logits = torch.tensor([[2.0, 0.0, -1.0, 5.0], [0.0, 2.0, -1.0, 4.0]], requires_grad=True)
    obj = torch.full((2, 4), 3.0)
    matched = torch.tensor([[True, True, True, False]] * 2)
    text = _unit(_axis(0), _axis(1))
    kw = {"temperature": 1.0, "objectness_weight": 1.0, "text_threshold": 0.999}
    within_image_loss(logits, obj, torch.tensor([0, 0]), text, candidates=matched, **kw).backward()
    assert logits.grad is not None
    assert logits.grad[:, 3].abs().max().item() == 0.0 and logits.grad[:, :3].abs().sum().item() > 0
    free = within_image_loss(logits.detach(), obj, torch.tensor([0, 0]), text, **kw).item()
    held = within_image_loss(logits.detach(), obj, torch.tensor([0, 0]), text, candidates=matched, **kw).item()
    assert held < free  # over every query both wordings pick slot 3 and clash there


def test_with_weak_mil_matched_the_contrast_pools_over_annotated_objects_only() -> None:
    # Image 0: query 3 is a background slot that fits the expression best, query 2 the object.
    text = _unit(_axis(0))
    inst = torch.stack([
        _unit(_axis(1), _axis(2), [0.8, 0.6, 0, 0, 0, 0, 0, 0], _axis(0)),
        _unit(_axis(3), _axis(4), _axis(5), _axis(6)),
    ])  # fmt: skip
    obj = torch.full((2, Q), 3.0)
    matched = torch.tensor([[True, True, True, False], [True, True, False, False]])
    grads = {}
    for flag in (False, True):
        x = inst.clone().requires_grad_(True)
        weak_contrastive_loss(text, torch.tensor([0]), x, obj, SCALE, BIAS, LossSpec(weak_mil_matched=flag),
                              matched=matched)["loss_weak"].backward()  # fmt: skip
        assert x.grad is not None
        grads[flag] = x.grad.norm(dim=-1)
    assert grads[False][0, 3] > grads[False][0, 2]  # by objectness alone the slot wins
    assert grads[True][0, 3].item() == 0.0 and grads[True][0, 2] > 0
    assert grads[True][1, 2:].abs().max().item() == 0.0  # nor do a negative image's unmatched slots count


def test_the_criterion_runs_the_competition_only_with_detection(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    batch = _weak_batch(proc)
    with torch.no_grad():
        model.config.loss = {**model.config.loss, "w_weak_within": 1.0}
        on = ReirCriterion(model.config, stage="weak")(model, batch)
        model.config.loss = {**model.config.loss, "weak_detection": False}
        off = ReirCriterion(model.config, stage="weak")(model, batch)
    assert on["loss_weak_within"].item() > 0
    assert off["loss_weak_within"].item() == 0.0


def test_an_untrained_encoder_does_not_suppress_every_negative(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    """Raw cosines of a random encoder are all near 1; centered ones are not."""
    model, proc = tiny
    model.config.loss = {**model.config.loss, "weak_text_threshold": 0.85, "weak_instance_threshold": 0.95}
    data = make_dataset(3, 8)
    for _, s in data:
        s.refs = [(f"the {c} {sh} number {k}", NO_REFERENT) for k, (c, sh) in enumerate(s.attrs)]
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    with torch.no_grad():
        parts = ReirCriterion(model.config, stage="weak")(model, batch)
        text = model.encode_text(batch.input_ids, batch.attention_mask).embeddings
    raw = text @ text.t()
    assert raw[~torch.eye(len(text), dtype=torch.bool)].min() > 0.85  # collapsed at init: all "duplicates"
    assert parts["weak_suppressed"].item() < 0.5


def _weak_batch(proc: ReirProcessor, seed: int = 0, n: int = 6):  # type: ignore[no-untyped-def]
    data = make_dataset(seed, n)
    return proc.collate([s for _, s in data], [im for im, _ in data])


def test_weak_loss_never_reads_referent_boxes(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    batch = _weak_batch(proc)
    assert int(batch.text_target_index.max()) > 0
    counts = torch.tensor([len(t["boxes"]) for t in batch.targets])[batch.text_image_index]
    # Every expression now points at another box of its own image.
    shuffled = replace(batch, text_target_index=(batch.text_target_index + 1) % counts)
    unknown = replace(batch, text_target_index=torch.full_like(batch.text_target_index, NO_REFERENT))
    weak = ReirCriterion(model.config, stage="weak")
    with torch.no_grad():
        ref = weak(model, batch)
        for other in (shuffled, unknown):
            assert weak(model, other)["loss"].item() == ref["loss"].item()
        # The check can fail: stage 1 does read the referent and its loss moves.
        stage1 = ReirCriterion(model.config, stage="1")
        assert stage1(model, shuffled)["loss"].item() != stage1(model, batch)["loss"].item()
    assert ref["loss_rec"].item() == 0.0 and ref["loss_clia"].item() == 0.0 and ref["loss_weak"].item() > 0


def test_without_detection_the_boxes_are_not_read_and_every_weight_joins_the_graph(
    tiny: tuple[ReirModel, ReirProcessor],
) -> None:
    model, proc = tiny
    # Uncapped suppression: the cap picks among near-equal likenesses of this random model,
    # and grad / no-grad forwards differ in the last bit; this test is about the boxes.
    model.config.loss = {**model.config.loss, "weak_detection": False, "weak_max_suppressed": 1.0}
    batch = _weak_batch(proc)
    moved = replace(batch, targets=[{**t, "boxes": t["boxes"].flip(0) * 0.5} for t in batch.targets])
    weak = ReirCriterion(model.config, stage="weak")
    parts = weak(model, batch)
    assert parts["loss_obj"].item() == 0.0 and parts["loss_l1"].item() == 0.0
    with torch.no_grad():
        assert weak(model, moved)["loss"].item() == parts["loss"].item()
    parts["loss"].backward()
    # DeepSpeed expects the same parameters to take part on every rank and step.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.vision.heads.embed[0].weight.grad.abs().sum() > 0


def test_stages_1_and_2_reject_weak_rows_by_name(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    data = make_dataset(0, 2)
    data[1][1].refs[0] = (data[1][1].refs[0][0], NO_REFERENT)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    for stage in ("1", "2"):
        with pytest.raises(ValueError, match=rf"{data[1][1].image_id}.*stage 'weak'"):
            ReirCriterion(model.config, stage=stage)(model, batch)
    assert torch.isfinite(ReirCriterion(model.config, stage="weak")(model, batch)["loss"])


def test_a_batch_without_expressions_trains_detection_only(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    data = make_dataset(0, 2)
    for _, s in data:
        s.refs.clear()  # COCO-style images: boxes, no expressions
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    parts = ReirCriterion(model.config, stage="weak")(model, batch)
    assert parts["loss_weak"].item() == 0.0 and parts["loss_obj"].item() > 0
    parts["loss"].backward()
    assert model.vision.heads.box[-1].weight.grad.abs().sum() > 0
