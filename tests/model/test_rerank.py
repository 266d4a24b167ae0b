"""The relation-aware re-ranker: shapes, masking, its non-negative relation weight, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reir.model import create_model
from reir.model.configuration import RerankSpec
from reir.model.rerank import SCALE_INIT, InputDropout, RelationReranker, relative_geometry, set_attention


def _inputs(n: int = 3, m: int = 4, t: int = 2, length: int = 5, dim: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    states = torch.randn(t, length, 8, generator=g)
    mask = torch.ones(t, length)
    mask[1, 3:] = 0
    base = torch.randn(n, m, generator=g)
    emb = torch.nn.functional.normalize(torch.randn(n, m, dim, generator=g), dim=-1)
    boxes = torch.rand(n, m, 4, generator=g) * 0.5 + 0.1
    obj = torch.rand(n, m, generator=g)
    inst_mask = torch.ones(n, m, dtype=torch.bool)
    inst_mask[2, 3] = False
    rows = torch.tensor([0, 1, 1])
    return states, mask, base, emb, boxes, obj, inst_mask, rows


def test_relative_geometry_is_antisymmetric_in_offsets_and_log_ratios() -> None:
    boxes = torch.tensor([[[0.2, 0.5, 0.1, 0.2], [0.7, 0.4, 0.3, 0.1]]])
    g = relative_geometry(boxes)
    assert g.shape == (1, 2, 2, 5)
    assert torch.allclose(g[0, 0, 1], -g[0, 1, 0])
    assert float(g[0, 0, 1, 0]) > 0  # box 1 is right of box 0
    assert torch.allclose(g[0, 0, 0], torch.zeros(5))


def test_relation_weight_is_non_negative_and_scales_the_relation_term_and_masks_padding() -> None:
    states, mask, base, emb, boxes, obj, inst_mask, rows = _inputs()
    torch.manual_seed(0)
    rr = RelationReranker(RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.0), text_hidden=8, embed_dim=16)
    assert float(rr.scale.detach()) == pytest.approx(SCALE_INIT, rel=1e-5)
    out = rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
    assert out.shape == base.shape
    assert torch.isneginf(out[2, 3])
    delta = out[inst_mask] - base[inst_mask]
    assert float(delta.abs().max()) > 1e-3
    rr.set_scale(2 * SCALE_INIT)
    doubled = rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
    assert torch.allclose(doubled[inst_mask] - base[inst_mask], 2 * delta, atol=1e-5)
    # however far an optimizer pushes its parameter down, the weight stays >= 0
    with torch.no_grad():
        rr.scale_raw.fill_(-50.0)
    assert 0.0 <= float(rr.scale.detach()) < 1e-20
    out = rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
    assert torch.allclose(out[inst_mask], base[inst_mask])


def test_input_dropout_acts_while_training_only() -> None:
    states, mask, base, emb, boxes, obj, inst_mask, rows = _inputs()
    rr = RelationReranker(RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.5), text_hidden=8, embed_dim=16)
    rr.set_scale(1.0)
    a, b = (rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows) for _ in range(2))
    assert not torch.allclose(a[inst_mask], b[inst_mask])
    rr.eval()
    a, b = (rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows) for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias_shape", [(6, 2, 10, 10), (6, 1, 1, 10)])
def test_set_attention_equals_torch_sdpa_in_values_and_gradients(dtype: torch.dtype, bias_shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 10, 8, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(bias_shape, generator=g, dtype=dtype)
    bias[0, ..., 7:] = -1e4  # padded instances, as InstanceSet.image_part masks them
    ours, ref = ([x.clone().requires_grad_(True) for x in (q, k, v, bias)] for _ in range(2))
    out = set_attention(*ours)
    expected = torch.nn.functional.scaled_dot_product_attention(*ref[:3], attn_mask=ref[3])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out, expected, atol=tol)
    weights = torch.randn(out.shape, generator=g, dtype=dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for a, b in zip(ours, ref, strict=True):
        assert a.grad is not None and b.grad is not None and a.grad.shape == b.grad.shape
        assert torch.allclose(a.grad, b.grad, atol=tol * 10)
    if dtype == torch.float64:
        small = [torch.randn(2, 2, 4, 3, generator=g, dtype=dtype) for _ in range(3)]
        small.append(torch.randn((2, 2, 4, 4) if bias_shape[1] > 1 else (2, 1, 1, 4), generator=g, dtype=dtype))
        assert torch.autograd.gradcheck(set_attention, tuple(x.requires_grad_(True) for x in small))


def test_input_dropout_keeps_each_input_with_one_minus_p_and_scales_it() -> None:
    torch.manual_seed(0)
    drop = InputDropout(0.4)
    x = torch.rand(200_000) + 0.5
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.6) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.6)
    assert not torch.equal(drop(x), drop(x))  # a new mask each call
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(InputDropout(1.0)(x), torch.zeros_like(x))


def test_earlier_free_relation_factor_loads_when_positive_and_is_refused_when_not() -> None:
    spec = RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.0)
    rr = RelationReranker(spec, text_hidden=8, embed_dim=16)
    old = {k: v for k, v in rr.state_dict().items() if k != "scale_raw"}
    fresh = RelationReranker(spec, text_hidden=8, embed_dim=16)
    fresh.load_state_dict({**old, "scale": torch.tensor([0.8])})
    assert float(fresh.scale.detach()) == pytest.approx(0.8, rel=1e-5)
    with pytest.raises(ValueError, match="relation weight of -0.2"):
        fresh.load_state_dict({**old, "scale": torch.tensor([-0.2])})


def test_trained_reranker_depends_on_the_other_instances_of_the_image() -> None:
    states, mask, base, emb, boxes, obj, inst_mask, rows = _inputs()
    torch.manual_seed(0)
    rr = RelationReranker(RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.0), text_hidden=8, embed_dim=16)
    rr.set_scale(1.0)  # as after training: the relation term is switched on
    out = rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
    moved = boxes.clone()
    moved[0, 1, 0] = 0.95  # move a neighbour of instance 0 in image 0 to the far right
    out_moved = rr(states, mask, base, emb, moved, obj, inst_mask, text_rows=rows)
    assert not torch.allclose(out[0, 0], out_moved[0, 0])
    assert torch.allclose(out[1], out_moved[1])  # other images are untouched
    # and on the expression: a different text row changes the scores
    out_text = rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=torch.tensor([1, 1, 1]))
    assert not torch.allclose(out[0], out_text[0])


def test_model_rerank_logits_without_and_with_reranker(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, processor = create_model("tiny")
    model.eval()
    enc = processor.text(["the red square", "the blue circle left of the red square"])
    _, _, _, emb, boxes, obj, inst_mask, _ = _inputs(dim=model.config.embed_dim)
    rows = torch.tensor([0, 1, 1])
    with torch.no_grad():
        plain = model.rerank_logits(enc["input_ids"], enc["attention_mask"], emb, boxes, obj, inst_mask, rows)
        text = model.encode_text(enc["input_ids"], enc["attention_mask"]).embeddings
        expected = model.score(text, emb)[rows, torch.arange(3)]
    assert torch.allclose(plain[inst_mask], expected[inst_mask], atol=1e-5)

    model.add_reranker(hidden_size=16, num_relations=4)
    assert model.reranker is not None
    model.reranker.set_scale(1.0)
    with torch.no_grad():
        reranked = model.rerank_logits(enc["input_ids"], enc["attention_mask"], emb, boxes, obj, inst_mask, rows)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = create_model(str(tmp_path))
    assert loaded.config.rerank["hidden_size"] == 16
    with torch.no_grad():
        again = loaded.rerank_logits(enc["input_ids"], enc["attention_mask"], emb, boxes, obj, inst_mask, rows)
    assert torch.allclose(reranked[inst_mask], again[inst_mask], atol=1e-5)
    assert not torch.allclose(reranked[inst_mask], plain[inst_mask])


def test_rows_sharing_images_score_as_if_each_row_had_its_own_copy() -> None:
    """``image_rows``: instances projected once per distinct image give the same logits and
    gradients as per-row copies, in the grouped-by-expression layout and in any other."""
    g = torch.Generator().manual_seed(1)
    t, c, m, u = 3, 4, 5, 6
    states, mask = torch.randn(t, 6, 8, generator=g), torch.ones(t, 6)
    emb, boxes = torch.randn(u, m, 16, generator=g), torch.rand(u, m, 4, generator=g) * 0.5 + 0.1
    obj, inst_mask = torch.rand(u, m, generator=g), torch.rand(u, m, generator=g) > 0.2
    inst_mask[:, 0] = True
    image_rows = torch.randint(u, (t * c,), generator=g)
    base = torch.randn(t * c, m, generator=g)
    grouped = torch.arange(t).repeat_interleave(c)
    torch.manual_seed(0)
    rr = RelationReranker(RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.0), text_hidden=8, embed_dim=16)
    rr.set_scale(0.7)

    def run(text_rows: torch.Tensor, shared: bool, order: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rr.zero_grad()
        rows = image_rows[order]
        if shared:
            out = rr(states, mask, base[order], emb, boxes, obj, inst_mask, text_rows=text_rows[order], image_rows=rows)
        else:
            out = rr(states, mask, base[order], emb[rows], boxes[rows], obj[rows], inst_mask[rows],
                     text_rows=text_rows[order])  # fmt: skip
        out.masked_fill(torch.isinf(out), 0).pow(2).sum().backward()
        return out, [p.grad.clone() for p in rr.parameters()]

    identity, shuffled = torch.arange(t * c), torch.randperm(t * c, generator=g)
    ref, ref_grads = run(grouped, shared=False, order=identity)
    for shared, order in ((True, identity), (True, shuffled), (False, shuffled)):
        out, grads = run(grouped, shared, order)
        assert torch.equal(torch.isinf(out), torch.isinf(ref[order]))
        assert torch.allclose(out.nan_to_num(neginf=0), ref[order].nan_to_num(neginf=0), atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, ref_grads))
    assert torch.isinf(ref[~inst_mask[image_rows]]).all() and not torch.isinf(ref[inst_mask[image_rows]]).any()


def _conjunction_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Expressions "<ref color> <ref shape> right of <landmark color> <landmark shape>" over
    pairs of images. Image A: the referent with the whole landmark to its right. Image B: a
    look-alike of the referent with two half-landmarks to its right (the landmark's color on
    another shape, the landmark's shape in another color) and the whole landmark to its left.
    Tokens are one-hot word + one-hot position; instances one-hot color + one-hot shape."""
    colors = shapes = 4
    words, length = colors + shapes + 1, 5
    states = torch.zeros(n, length, words + length)
    emb = torch.zeros(2 * n, 4, colors + shapes)
    boxes = torch.full((2 * n, 4, 4), 0.1)
    for i in range(n):
        cr, cl, cx = torch.randperm(colors, generator=g)[:3].tolist()
        sr, sl, sx = torch.randperm(shapes, generator=g)[:3].tolist()
        for pos, word in enumerate((cr, colors + sr, colors + shapes, cl, colors + sl)):
            states[i, pos, word] = states[i, pos, words + pos] = 1.0
        scene_a = [((cr, sr), (0.3, 0.5)), ((cl, sl), (0.7, 0.5)), ((cx, sx), (0.1, 0.1)), ((cx, sl), (0.3, 0.9))]
        scene_b = [((cr, sr), (0.3, 0.5)), ((cl, sx), (0.7, 0.4)), ((cx, sl), (0.7, 0.6)), ((cl, sl), (0.05, 0.5))]
        for img, scene in ((2 * i, scene_a), (2 * i + 1, scene_b)):
            for k, ((c, s), (x, y)) in enumerate(scene):
                emb[img, k, c] = emb[img, k, colors + s] = 1.0
                boxes[img, k, 0], boxes[img, k, 1] = x, y
    return states, torch.ones(n, length), torch.nn.functional.normalize(emb, dim=-1), boxes


def test_reranker_learns_that_half_landmarks_do_not_make_a_whole_one() -> None:
    """Learned from scratch on toy batches, scored on held-out ones: the re-ranker must read
    the relation (the whole landmark to the *left* of image B's look-alike does not count)
    and the landmark as a conjunction (two instances that each fit half of its description,
    to the right, must not add up to one that fits all of it). The answer is image A's
    slot 0; untrained, the re-ranker scores every instance alike."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rr = RelationReranker(RerankSpec(hidden_size=32, num_relations=4, geometry_hidden=16, input_dropout=0.0), text_hidden=14, embed_dim=8)
    opt = torch.optim.Adam(rr.parameters(), lr=1e-2)

    def logits(n: int) -> torch.Tensor:
        states, mask, emb, boxes = _conjunction_batch(n, g)
        rows = torch.arange(n).repeat_interleave(2)
        out = rr(states, mask, torch.zeros(2 * n, 4), emb, boxes, torch.ones(2 * n, 4),
                 torch.ones(2 * n, 4, dtype=torch.bool), text_rows=rows)  # fmt: skip
        return out.view(n, 8)  # per expression: image A's 4 instances, then image B's

    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(logits(32), torch.zeros(32, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held_out = logits(200)
    accuracy = float((held_out.argmax(dim=1) == 0).float().mean())
    assert accuracy >= 0.95, f"picked image A's referent for {accuracy:.1%} of held-out expressions"


def test_a_checkpoint_with_the_earlier_reranker_form_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """Re-ranker checkpoints from before the existential term (a gate over R+1 slots, no
    ``match_bias``) cannot be scored by this form: loading says so instead of a bare
    state-dict mismatch."""
    from safetensors.torch import load_file, save_file

    model, processor = create_model("tiny")
    model.add_reranker(hidden_size=16, num_relations=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    create_model(str(tmp_path))  # the current form loads
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["reranker.match_bias"]
    state["reranker.gate.weight"] = torch.zeros(5, state["reranker.gate.weight"].shape[1])
    state["reranker.gate.bias"] = torch.zeros(5)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="earlier bilinear-only form"):
        create_model(str(tmp_path))


def test_image_features_computed_once_give_the_same_logits() -> None:
    """The text-free half (``image_features``) cached for a gallery and scored later for any rows
    (``score_features``) equals the one-call forward on those rows."""
    states, mask, base, emb, boxes, obj, inst_mask, rows = _inputs()
    torch.manual_seed(0)
    rr = RelationReranker(RerankSpec(hidden_size=16, num_relations=4), text_hidden=8, embed_dim=16).eval()
    with torch.no_grad():
        features = rr.image_features(emb, boxes, obj, inst_mask)
        images = torch.tensor([2, 0, 2])
        want = rr(states, mask, base, emb[images], boxes[images], obj[images], inst_mask[images], text_rows=rows)
        got = rr.score_features(states, mask, base, features, text_rows=rows, image_rows=images)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)) and torch.isneginf(got[0, 3])
    assert torch.allclose(got[~torch.isneginf(want)], want[~torch.isneginf(want)], atol=1e-6)


def test_a_new_reranker_reads_the_expression_through_its_own_text_layer_and_it_round_trips(tmp_path: Path) -> None:
    """A fresh re-ranker gets ``text_layers`` transformer layers over the token states (the
    pooled slots then depend on word order, not on a bag of words); a checkpoint written before
    the field existed (no ``text_layers`` key) loads as the form without them."""
    import json

    torch.manual_seed(0)
    model, processor = create_model("tiny")
    model.eval()
    reranker = model.add_reranker(hidden_size=16, num_relations=4)
    assert model.config.rerank["text_layers"] == 1 and reranker.text_encoder is not None
    enc = processor.text(["the red square left of the blue circle", "the blue circle left of the red square"])
    states = model.encode_text(enc["input_ids"], enc["attention_mask"]).token_states
    with torch.no_grad():
        slots, _, _ = reranker.text_slots(states, enc["attention_mask"])
        reranker.text_encoder = None  # the same weights pooled without the layer
        pooled, _, _ = reranker.text_slots(states, enc["attention_mask"])
    assert not torch.allclose(slots, pooled)
    model.add_reranker(hidden_size=16, num_relations=4, text_layers=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = create_model(str(tmp_path))
    assert loaded.reranker is not None and loaded.reranker.text_encoder is not None
    assert len(loaded.reranker.text_encoder.layers) == 2
    # a config written before the field: no text layers, and its weights load strictly
    model.add_reranker(hidden_size=16, num_relations=4, text_layers=0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rerank"]["text_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old, _ = create_model(str(tmp_path))
    assert old.reranker is not None and old.reranker.text_encoder is None


def test_packed_instance_sets_hold_each_image_in_its_own_row_and_size() -> None:
    """Images of different sizes and instance counts: each row holds its image's instances in
    order (cxcywh relative to that image's own width/height), padding stays zero and masked."""
    import numpy as np

    from reir.model.rerank import pack_instance_sets

    rng = np.random.default_rng(0)
    counts, sizes = [3, 1, 5], [(200.0, 100.0), (640.0, 480.0), (50.0, 80.0)]
    embeddings = [[rng.normal(size=8).astype(np.float16) for _ in range(k)] for k in counts]
    boxes = [[[float(v) for v in rng.uniform(0, 40, size=4)] for _ in range(k)] for k in counts]
    scores = [[float(v) for v in rng.uniform(size=k)] for k in counts]
    emb, packed, objectness, mask = pack_instance_sets(embeddings, boxes, scores, sizes)
    assert emb.shape == (3, 5, 8) and packed.shape == (3, 5, 4) and mask.tolist() == [
        [True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]  # fmt: skip
    for i, (k, (width, height)) in enumerate(zip(counts, sizes, strict=True)):
        for j in range(k):
            x, y, w, h = boxes[i][j]
            expected = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
            np.testing.assert_allclose(packed[i, j], expected, rtol=1e-6)
            np.testing.assert_array_equal(emb[i, j], embeddings[i][j].astype(np.float32))
            assert objectness[i, j] == np.float32(scores[i][j])
    assert not emb[~mask].any() and not packed[~mask].any() and not objectness[~mask].any()
    with pytest.raises(ValueError, match="as many boxes"):
        pack_instance_sets(embeddings, [boxes[0], boxes[1], boxes[2][:-1]], scores, sizes)


def test_context_relation_counts_every_other_instance_wherever_it_is() -> None:
    """``RerankSpec.context_relation``: one more relation whose weight is 1 for every other
    (unmasked) instance, so "in the image with ..." depends on what the image holds, not
    where: with only its gate open, moving the instances around changes nothing, and
    taking one out does."""
    states, mask, base, emb, boxes, obj, inst_mask, rows = _inputs()
    torch.manual_seed(0)
    rr = RelationReranker(RerankSpec(hidden_size=16, num_relations=2, input_dropout=0.0, context_relation=True),
                          text_hidden=8, embed_dim=16)
    assert rr.queries.shape[0] == 1 + 2 + 1 and rr.gate.out_features == rr.match_bias.numel() == 3
    w = rr.image_features(emb, boxes, obj, inst_mask).w
    m = inst_mask.shape[1]
    pairs = (inst_mask[:, None, :] & ~torch.eye(m, dtype=torch.bool)[None]).float()
    assert torch.equal(w[..., -1], pairs)  # 1 for every other instance, 0 for itself and padding
    assert not torch.equal(w[..., 0], pairs)  # the learned ones depend on the geometry
    with torch.no_grad():  # only the context relation's gate open
        rr.gate.weight.zero_()
        rr.gate.bias.copy_(torch.tensor([-30.0, -30.0, 30.0]))
    out = rr(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
    moved = rr(states, mask, base, emb, boxes.flip(1), obj, inst_mask, text_rows=rows)
    assert torch.allclose(out, moved, atol=1e-5)
    fewer = inst_mask.clone()
    fewer[0, 1] = False
    without = rr(states, mask, base, emb, boxes, obj, fewer, text_rows=rows)
    assert float((without[0, [0, 2, 3]] - out[0, [0, 2, 3]]).abs().max()) > 1e-4
    assert torch.allclose(without[1:], out[1:])


def test_a_new_reranker_has_the_context_relation_and_a_stored_one_without_the_field_does_not() -> None:
    model, _ = create_model("tiny")
    assert model.add_reranker().spec.context_relation
    assert not RerankSpec(hidden_size=16, num_relations=4).context_relation


def test_a_new_reranker_has_an_instance_set_layer_and_a_stored_one_without_the_field_does_not(tmp_path: Path) -> None:
    model, processor = create_model("tiny")
    reranker = model.add_reranker()
    assert reranker.spec.set_layers == 1 and reranker.instance_set is not None
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = create_model(str(tmp_path))
    assert loaded.reranker is not None and loaded.reranker.instance_set is not None
    assert all(torch.equal(a, b) for a, b in zip(loaded.reranker.state_dict().values(), reranker.state_dict().values()))
    assert RelationReranker(RerankSpec(hidden_size=16, num_relations=4), 8, 16).instance_set is None


def test_instance_set_layers_start_as_the_form_without_them_and_share_images_exactly() -> None:
    """``set_layers``: the instance set's logit starts at zero (a re-ranker with the layers and the
    same other weights scores alike), and once it is not zero, rows sharing images
    (``image_rows``) and features computed once per image still give the per-row logits."""
    states, mask, base, emb, boxes, obj, inst_mask, rows = _inputs()
    torch.manual_seed(0)
    plain = RelationReranker(RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.0), 8, 16).eval()
    layered = RelationReranker(RerankSpec(hidden_size=16, num_relations=4, input_dropout=0.0, set_layers=2,
                                          set_hidden=8), 8, 16).eval()  # fmt: skip
    missing, unexpected = layered.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("instance_set.") for k in missing)
    with torch.no_grad():
        want = plain(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
        got = layered(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        assert torch.allclose(got.nan_to_num(neginf=0), want.nan_to_num(neginf=0), atol=1e-6)
        torch.nn.init.normal_(layered.instance_set.out.weight)
        moved = layered(states, mask, base, emb, boxes, obj, inst_mask, text_rows=rows)
        assert not torch.allclose(moved.nan_to_num(neginf=0), want.nan_to_num(neginf=0), atol=1e-3)
        images = torch.tensor([2, 0, 2])
        per_row = layered(states, mask, base, emb[images], boxes[images], obj[images], inst_mask[images],
                          text_rows=rows)  # fmt: skip
        shared = layered.score_features(states, mask, base, layered.image_features(emb, boxes, obj, inst_mask),
                                        text_rows=rows, image_rows=images)  # fmt: skip
    assert torch.equal(torch.isneginf(shared), torch.isneginf(per_row)) and torch.isneginf(shared[0, 3])
    assert torch.allclose(shared.nan_to_num(neginf=0), per_row.nan_to_num(neginf=0), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # no learned relations: empty layers
def test_instance_set_layers_alone_learn_which_look_alike_is_second_from_the_left() -> None:
    """Rows of 3-5 identical instances at random places; the expression asks for the leftmost,
    the second from the left, the rightmost or the second from the right. With no learned
    relations, the relation term switched off (s ~ 0) and no dual-encoder score, only the
    instance set's attention sees where the others are. Learned from scratch, scored on new rows."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    spec = RerankSpec(hidden_size=16, num_relations=0, geometry_hidden=16, input_dropout=0.0, set_layers=1, set_hidden=32)
    rr = RelationReranker(spec, text_hidden=4, embed_dim=4)
    rr.set_scale(1e-6)
    rr.scale_raw.requires_grad_(False)
    opt = torch.optim.Adam([p for p in rr.parameters() if p.requires_grad], lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked = torch.randint(4, (n,), generator=g)  # leftmost, second from left, rightmost, second from right
        states = torch.nn.functional.one_hot(asked, 4).float()[:, None, :]
        count = torch.randint(3, 6, (n,), generator=g)
        inst_mask = torch.arange(5)[None, :] < count[:, None]
        boxes = torch.full((n, 5, 4), 0.1)
        boxes[:, :, 0], boxes[:, :, 1] = torch.rand(n, 5, generator=g) * 0.8 + 0.1, torch.rand(n, 5, generator=g)
        emb = torch.ones(n, 5, 4) / 2.0
        logits = rr(states, torch.ones(n, 1), torch.zeros(n, 5), emb, boxes, torch.ones(n, 5), inst_mask)
        x = boxes[:, :, 0].masked_fill(~inst_mask, float("inf"))
        order = x.argsort(dim=1)  # left to right, padding last
        pick = torch.stack([order[:, 0], order[:, 1], order.gather(1, (count - 1)[:, None])[:, 0],
                            order.gather(1, (count - 2)[:, None])[:, 0]], dim=1)  # fmt: skip
        return logits, pick.gather(1, asked[:, None])[:, 0]

    for _ in range(600):
        logits, target = batch(64)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits, target = batch(400)
    accuracy = float((logits.argmax(dim=1) == target).float().mean())
    assert accuracy >= 0.9, f"picked the asked-for look-alike in {accuracy:.1%} of new rows"


def test_a_new_rerankers_slots_start_apart() -> None:
    """A new re-ranker's relation-slot queries start large enough (``query_init``) that each slot
    pools its own mix of the expression's tokens; at unit scale every slot started on about the
    same vector, a symmetry some seeds never broke in a demo's 1,800 steps."""
    from reir.model.modeling import NEW_RERANKER_QUERY_INIT

    def slot_cosine(query_init: float, seed: int) -> float:
        torch.manual_seed(seed)
        spec = RerankSpec(hidden_size=128, text_layers=1, context_relation=True, set_layers=1, query_init=query_init)
        rr = RelationReranker(spec, text_hidden=128, embed_dim=128)
        with torch.no_grad():
            slots = rr.text_slots(torch.randn(16, 14, 128), torch.ones(16, 14, dtype=torch.bool))[0]
        slots = torch.nn.functional.normalize(slots, dim=-1)
        cos = slots @ slots.transpose(1, 2)
        n = cos.shape[1]
        return float((cos.sum() - cos.diagonal(dim1=1, dim2=2).sum()) / (cos.shape[0] * n * (n - 1)))

    for seed in range(3):
        assert slot_cosine(1.0, seed) > 0.99 > slot_cosine(NEW_RERANKER_QUERY_INIT, seed)


def test_add_reranker_starts_a_new_one_at_the_new_query_scale() -> None:
    """A model without a re-ranker gets one at ``NEW_RERANKER_QUERY_INIT``, recorded in its config;
    a caller's own ``query_init`` wins."""
    from reir.model import create_model
    from reir.model.modeling import NEW_RERANKER_QUERY_INIT

    model, _ = create_model("tiny")
    rr = model.add_reranker(hidden_size=16)
    assert rr.spec.query_init == NEW_RERANKER_QUERY_INIT == model.config.rerank["query_init"]
    assert model.add_reranker(hidden_size=16, query_init=1.0).spec.query_init == 1.0
