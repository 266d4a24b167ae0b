from __future__ import annotations

import math

import pytest
import torch

from reir.model import (
    ReirCriterion,
    ReirModel,
    ReirProcessor,
    create_model,
    hungarian_match,
    siglip_pair_loss,
)
from reir.model.configuration import MoreSpec
from reir.model.modeling import MixtureOfRelationExperts

from .synthetic import make_dataset


def test_hungarian_hand_made() -> None:
    preds = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.1, 0.1]])
    gts = torch.tensor([[0.21, 0.2, 0.1, 0.12], [0.69, 0.7, 0.2, 0.2]])
    match = hungarian_match(preds, torch.zeros(3), gts)
    assert match.tolist() == [2, 0]
    # Objectness breaks ties between two identical boxes.
    twins = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    assert hungarian_match(twins, torch.tensor([-5.0, 5.0]), twins[:1]).tolist() == [1]
    assert hungarian_match(preds, torch.zeros(3), gts[:0]).numel() == 0


def test_siglip_loss_hand_made() -> None:
    emb = torch.eye(3)
    logits = 10 * emb @ emb.t() - 5  # positives +5, negatives -5
    perfect = siglip_pair_loss(logits, torch.eye(3, dtype=torch.bool))
    # 9 pairs, each contributes softplus(-5); normalized by 3 texts.
    assert perfect.item() == pytest.approx(3 * math.log1p(math.exp(-5)), rel=1e-5)
    shuffled = siglip_pair_loss(logits, torch.eye(3, dtype=torch.bool)[[1, 2, 0]])
    assert shuffled.item() > 10 * perfect.item()
    masked = siglip_pair_loss(logits, torch.eye(3, dtype=torch.bool), valid=torch.tensor([True, True, False]))
    assert masked.item() == pytest.approx(2 * math.log1p(math.exp(-5)), rel=1e-5)


def test_more_top_k_and_balance_loss() -> None:
    more = MixtureOfRelationExperts(8, 4, MoreSpec(num_experts=4, top_k=2))
    out, aux, probs = more(torch.randn(32, 8))
    assert out.shape == (32, 4) and probs.shape == (32, 4)
    assert 1.0 <= aux.item() < 1.5  # ~1 when routing is balanced (Switch normalization)
    torch.nn.init.zeros_(more.gate.weight)
    more.gate.bias.data = torch.tensor([10.0, 9.0, 0.0, 0.0])  # collapse onto experts 0, 1
    assert more(torch.randn(32, 8))[1].item() > 1.9
    with pytest.raises(ValueError):
        MixtureOfRelationExperts(8, 4, MoreSpec(num_experts=2, top_k=3))


@pytest.mark.parametrize("stage", ["1", "2"])
def test_criterion_runs_and_backprops(tiny: tuple[ReirModel, ReirProcessor], stage: str) -> None:
    model, proc = tiny
    model.train()
    data = make_dataset(0, 4)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    parts = ReirCriterion(model.config, stage=stage)(model, batch)
    assert set(parts) == {"loss", "loss_obj", "loss_l1", "loss_giou", "loss_cls", "loss_app", "loss_probe", "loss_rec",
                          "loss_clia", "loss_aux"}
    assert parts["loss_app"].item() == 0.0  # tiny has no appearance head
    assert parts["loss_probe"].item() == 0.0  # nor embedding probes
    assert all(torch.isfinite(v) for v in parts.values())
    assert (parts["loss_clia"].item() > 0) == (stage == "2")
    parts["loss"].backward()
    for name in ["vision.backbone.layers.0.0.weight", "vision.heads.embed.0.weight", "vision.heads.box.4.weight",
                 "text.model.embeddings.word_embeddings.weight", "text.more.gate.weight", "logit_scale", "vision.heads.classifier.weight"]:  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_class_loss_trains_matched_queries_and_rejects_unknown_labels(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    data = make_dataset(0, 4)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    criterion = ReirCriterion(model.config, stage="1")
    num_classes = model.config.vision_spec.num_classes
    assert num_classes > 0
    assert 0 < criterion(model, batch)["loss_cls"].item() < 3 * math.log(num_classes)
    batch.targets[0]["labels"][0] = num_classes
    with pytest.raises(ValueError, match="num_classes"):
        criterion(model, batch)


@pytest.mark.parametrize("stage", ["1", "weak"])
def test_appearance_head_learns_the_colour_of_its_box(stage: str) -> None:
    """The appearance head's target is the mean pixel of each annotated box's centre; a
    few steps on that loss alone bring the matched queries' predictions near it."""
    model, proc = create_model("tiny", vision={"appearance_head": True})
    model.train()
    data = make_dataset(0, 4)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    criterion = ReirCriterion(model.config, stage=stage)
    opt = torch.optim.Adam(model.vision.heads.appearance.parameters(), lr=0.05)
    first = criterion(model, batch)["loss_app"].item()
    assert first > 0.05
    for _ in range(60):
        opt.zero_grad()
        parts = criterion(model, batch)
        parts["loss_app"].backward()
        opt.step()
    assert parts["loss_app"].item() < 0.3 * first
    model.zero_grad()
    criterion(model, batch)["loss"].backward()  # the total carries it (w_appearance)
    assert model.vision.heads.appearance.weight.grad.abs().sum() > 0


def test_appearance_head_without_detection_joins_the_graph_at_zero() -> None:
    model, proc = create_model("tiny", vision={"appearance_head": True}, loss={"weak_detection": False})
    data = make_dataset(0, 2)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    parts = ReirCriterion(model.config, stage="weak")(model, batch)
    assert parts["loss_app"].item() == 0.0
    parts["loss"].backward()
    assert model.vision.heads.appearance.weight.grad is not None  # every rank sees the same parameters


def test_embedding_probes_train_the_stored_vector_to_carry_class_and_colour() -> None:
    """The probes read the L2-normalized instance embedding (what the index stores), so their
    loss reaches the embedding MLP, and a few steps on it alone bring it down."""
    model, proc = create_model("tiny", vision={"appearance_head": True, "embedding_probes": True})
    model.train()
    data = make_dataset(0, 4)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    criterion = ReirCriterion(model.config, stage="1")
    parts = criterion(model, batch)
    first = parts["loss_probe"].item()
    assert first > 0.5  # an untrained class probe alone is ~log(num_classes)
    parts["loss_probe"].backward()
    heads = model.vision.heads
    for module in (heads.probe_class, heads.probe_appearance, heads.embed):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert heads.appearance.weight.grad is None  # the token-level head is not what the probe trains
    opt = torch.optim.Adam([*heads.probe_class.parameters(), *heads.probe_appearance.parameters(),
                            *heads.embed.parameters()], lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        loss = criterion(model, batch)["loss_probe"]
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_scene_probe_reads_the_image_label_from_the_stored_vector() -> None:
    """``vision.num_scene_classes``: a third probe reads each image's scene label from every
    matched query's embedding; images without a label (-1) add nothing, a label out of range
    is refused, and steps on the probe loss bring the scene part down."""
    model, proc = create_model("tiny", vision={"appearance_head": True, "embedding_probes": True,
                                               "num_scene_classes": 3})
    model.train()
    data = make_dataset(0, 4)
    samples = [s for _, s in data]
    images = [im for im, _ in data]
    criterion = ReirCriterion(model.config, stage="1")
    heads = model.vision.heads

    for s in samples:
        s.scene = -1
    unlabelled = proc.collate(samples, images)
    criterion(model, unlabelled)["loss_probe"].backward()
    assert heads.probe_scene.weight.grad is None or heads.probe_scene.weight.grad.abs().sum() == 0
    model.zero_grad()

    for k, s in enumerate(samples):
        s.scene = k % 3
    labelled = proc.collate(samples, images)
    assert [int(t["scene"][0]) for t in labelled.targets] == [0, 1, 2, 0]

    def scene_part() -> torch.Tensor:  # the same images and parameters, with and without labels
        return criterion(model, labelled)["loss_probe"] - criterion(model, unlabelled)["loss_probe"]

    first = scene_part()
    assert first.item() == pytest.approx(math.log(3), abs=0.6)  # an untrained 3-way probe
    first.backward()
    assert heads.probe_scene.weight.grad.abs().sum() > 0 and heads.embed[0].weight.grad.abs().sum() > 0

    opt = torch.optim.Adam([*heads.probe_scene.parameters(), *heads.embed.parameters()], lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        criterion(model, labelled)["loss_probe"].backward()
        opt.step()
    assert scene_part().item() < 0.3 * first.item()

    samples[0].scene = 3
    with pytest.raises(ValueError, match="num_scene_classes"):
        criterion(model, proc.collate(samples, images))


def test_criterion_without_texts(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    data = make_dataset(0, 2)
    for _, s in data:
        s.refs.clear()
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    parts = ReirCriterion(model.config, stage="2")(model, batch)
    assert torch.isfinite(parts["loss"]) and parts["loss_rec"].item() == 0.0
    with pytest.raises(ValueError):
        ReirCriterion(model.config, stage="3")


def test_identical_expressions_share_positives(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    from reir.model import losses

    model, proc = tiny
    data = make_dataset(0, 3)
    refs = ["the red square", "the red square", "the blue circle"]  # same words on two images
    for (_, s), text in zip(data, refs):
        s.refs = [(text, 0)]
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    keys = losses.text_keys(batch.input_ids, batch.attention_mask)
    assert keys[0] == keys[1] != keys[2]
    q = model.num_queries
    cols = torch.tensor([0 * q + 5, 1 * q + 7, 2 * q + 1])  # each referent's global column
    positives = losses.shared_positives(keys, keys, cols, num_columns=3 * q)
    assert positives.sum(dim=1).tolist() == [2, 2, 1]
    assert positives[0, 5] and positives[0, q + 7] and positives[1, 5] and positives[1, q + 7]
    assert positives[2, 2 * q + 1] and not positives[2, : 2 * q].any()
    # A padding row of the gather (column -1) is never anyone's positive.
    padded = losses.shared_positives(keys, torch.cat([keys, keys[:1]]), torch.cat([cols, torch.tensor([-1])]),
                                     num_columns=3 * q)
    assert torch.equal(padded, positives)


def test_under_cpu_autocast_both_towers_run_in_bf16_and_the_losses_in_fp32(
    tiny: tuple[ReirModel, ReirProcessor],
) -> None:
    """reir.training.precision: the forward under bf16 autocast (both towers; the text tower's
    attention is the eager one), the losses in fp32; the losses come out close to the fp32 ones
    and every part still gets gradients."""
    model, proc = tiny
    model.train()
    data = make_dataset(1, 4)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    criterion = ReirCriterion(model.config, stage="2")
    torch.manual_seed(0)
    reference = {k: v.item() for k, v in criterion(model, batch).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text = model.encode_text(batch.input_ids, batch.attention_mask)
        vision = model.encode_images(batch.pixel_values)
        torch.manual_seed(0)
        parts = criterion(model, batch)
    assert model.text.model.config._attn_implementation == "eager"
    assert text.embeddings.dtype == torch.bfloat16 and text.token_states is not None  # the text tower ran in bf16
    assert vision.embeddings.dtype == torch.bfloat16  # and the visual branch
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())
    for name in ("loss", "loss_rec", "loss_clia", "loss_obj"):
        assert parts[name].item() == pytest.approx(reference[name], rel=0.1, abs=0.05), name
    parts["loss"].backward()
    for name in ("vision.backbone.layers.0.0.weight", "text.model.embeddings.word_embeddings.weight", "logit_scale"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

