"""Stage ``rerank`` building blocks: the frozen feature set, hard negatives, and learning
a relation the dual encoder cannot express."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from reir.data.formats import load_samples, negative_groups
from reir.model.processing import NO_REFERENT
from reir.model.rerank import RelationReranker, RerankSpec, width_groups
from reir.training.rerank import (
    RerankSet,
    build_rerank_set,
    calibration_split,
    candidate_logits,
    draw_negatives,
    mine_hard_negatives,
    rerank_loss,
    sample_texts,
)


def _relation_world(n: int, seed: int) -> RerankSet:
    """Images with two look-alike instances (attribute ``a``) on either side of a landmark
    (attribute ``b``) and a distractor; the expression "a LEFT/RIGHT OF b" picks one of
    the look-alikes. The dual encoder's logit (similarity to ``a``) ties them."""
    g = torch.Generator().manual_seed(seed)
    dim, m = 16, 4
    palette = torch.eye(dim)[:6]
    # token states: 6 attributes + LEFT + RIGHT, the same "language" for every world
    words = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    emb, boxes, positive, states, text_emb = [], [], [], [], []
    for _ in range(n):
        a, b, c = torch.randperm(6, generator=g)[:3].tolist()
        rel = int(torch.randint(2, (1,), generator=g))
        xs = [0.2, 0.8, 0.5, float(torch.rand(1, generator=g)) * 0.8 + 0.1]
        attrs = [a, a, b, c]
        perm = torch.randperm(m, generator=g).tolist()
        emb.append(palette[[attrs[p] for p in perm]])
        boxes.append(torch.tensor([[xs[p], 0.3 + 0.1 * k, 0.1, 0.1] for k, p in enumerate(perm)]))
        positive.append(perm.index(0 if rel == 0 else 1))  # the look-alike left (0) or right (1) of b
        states.append(torch.stack([words[a], words[6 + rel], words[b]]))
        text_emb.append(palette[a])
    return RerankSet(
        image_ids=[f"img{i}" for i in range(n)], emb=torch.stack(emb), boxes=torch.stack(boxes),
        objectness=torch.ones(n, m), mask=torch.ones(n, m, dtype=torch.bool), groups=torch.zeros(n, dtype=torch.long),
        token_states=torch.stack(states), token_mask=torch.ones(n, 3, dtype=torch.long), text_emb=torch.stack(text_emb),
        text_image=torch.arange(n), positive=torch.tensor(positive),
    )  # fmt: skip


def _own_image_accuracy(rr: RelationReranker, rs: RerankSet) -> float:
    with torch.no_grad():
        base = 5.0 * torch.einsum("nd,nmd->nm", rs.text_emb, rs.emb)
        logits = rr(rs.token_states, rs.token_mask, base, rs.emb, rs.boxes, rs.objectness, rs.mask)
    return float((logits.argmax(dim=1) == rs.positive).float().mean())


def _ragged_world(n: int, k: int, seed: int) -> RerankSet:
    """``n`` images with 1..k stored instances each (most few, some many, as a score floor
    stores them) and one random expression per image."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.where(torch.rand(n, generator=g) < 0.8, torch.randint(1, k // 2 + 1, (n,), generator=g),
                         torch.randint(k // 2 + 1, k + 1, (n,), generator=g))  # fmt: skip
    mask = torch.arange(k)[None, :] < counts[:, None]
    emb = torch.nn.functional.normalize(torch.randn(n, k, 16, generator=g), dim=-1) * mask[..., None]
    return RerankSet(
        image_ids=[f"img{i}" for i in range(n)], emb=emb, boxes=torch.rand(n, k, 4, generator=g) * 0.5 + 0.1,
        objectness=torch.rand(n, k, generator=g) * mask, mask=mask, groups=torch.zeros(n, dtype=torch.long),
        token_states=torch.randn(n, 5, 8, generator=g), token_mask=torch.ones(n, 5, dtype=torch.long),
        text_emb=torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1), text_image=torch.arange(n),
        positive=torch.zeros(n, dtype=torch.long),
    )  # fmt: skip


def test_candidate_logits_score_each_set_at_its_width_exactly() -> None:
    """The re-ranker scores images of few instances apart from the widest ones
    (``RelationReranker.forward``): the logits and their gradients equal one padded pass over
    the whole batch; padded slots stay -inf."""
    torch.manual_seed(0)
    k = 12
    rs = _ragged_world(40, k, seed=3)
    rr = RelationReranker(RerankSpec(hidden_size=16, geometry_hidden=8, set_layers=1, set_hidden=8, input_dropout=0.0),
                          text_hidden=8, embed_dim=16)  # fmt: skip
    text_idx = torch.arange(40)
    negs = torch.stack([torch.randperm(40)[:7] for _ in text_idx])
    negs[0, 3] = -1  # no image
    imgs = torch.cat([rs.text_image[text_idx][:, None], negs], dim=1).reshape(-1)
    counts = rs.mask.sum(1)
    uses = torch.bincount(imgs.clamp(min=0), minlength=40)
    assert len(width_groups(counts, uses)) == 2  # this batch is split
    logits = candidate_logits(rr, rs, text_idx, negs, 4.0, -1.0)
    base = 4.0 * torch.einsum("bd,bckd->bck", rs.text_emb[text_idx],
                              rs.emb[imgs.clamp(min=0)].view(len(text_idx), 8, k, -1)).reshape(-1, k) - 1.0
    one_pass = rr.score_features(rs.token_states[text_idx], rs.token_mask[text_idx], base,
                                 rr.image_features(rs.emb, rs.boxes, rs.objectness, rs.mask),
                                 torch.arange(len(text_idx)).repeat_interleave(8), imgs.clamp(min=0))  # fmt: skip
    ref = one_pass.masked_fill((imgs < 0)[:, None], float("-inf")).view(len(text_idx), -1)
    assert torch.equal(torch.isinf(logits), torch.isinf(ref))
    assert int(torch.isfinite(logits).sum()) == int(rs.mask[imgs[imgs >= 0]].sum())
    torch.testing.assert_close(logits[torch.isfinite(logits)], ref[torch.isfinite(ref)], atol=1e-5, rtol=1e-5)
    grads = []
    for out in (logits, ref):
        rr.zero_grad()
        out.masked_fill(torch.isinf(out), 0.0).pow(2).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in rr.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 5
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    groups = width_groups(counts, torch.full((40,), 8))
    assert len(groups) == 2 and int(counts[groups[0]].max()) <= int(counts[groups[1]].min())
    assert sorted(torch.cat(groups).tolist()) == list(range(40))
    assert len(width_groups(torch.full((10,), 5), torch.ones(10, dtype=torch.long))) == 1  # nothing to save
    assert len(width_groups(counts, torch.ones(40, dtype=torch.long))) == 1  # too few rows to pay a second pass


def test_reranker_learns_a_spatial_relation_the_dual_encoder_ties_on() -> None:
    torch.manual_seed(0)
    train, held_out = _relation_world(256, seed=1), _relation_world(128, seed=2)
    rr = RelationReranker(RerankSpec(hidden_size=32, num_relations=4, input_dropout=0.0), text_hidden=8, embed_dim=16)
    assert _own_image_accuracy(rr, held_out) <= 0.7  # ties: the dual encoder guesses between two
    negatives = mine_hard_negatives(train, 3)
    opt = torch.optim.AdamW(rr.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(train.num_texts, (32,), generator=gen)
        loss = rerank_loss(rr, train, idx, negatives[idx], 5.0, 0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _own_image_accuracy(rr, held_out) >= 0.9


def _conjunction_world(n: int, seed: int) -> tuple[RerankSet, list[list[tuple[int, int]]]]:
    """Instances are (colour, shape) pairs; each image holds the referent (c, s) and two
    half matches, (c, s') and (c', s), plus a random one. The expression names c and s;
    the dual encoder knows the colour only, so it ties the referent with (c, s'). Returns
    the set (``positive``: the referent's slot, for scoring only) and each image's pairs in slot order."""
    g = torch.Generator().manual_seed(seed)
    colours = shapes = 4
    words = torch.randn(colours + shapes, 8, generator=torch.Generator().manual_seed(0))
    emb, boxes, positive, states, text_emb, contents = [], [], [], [], [], []
    for _ in range(n):
        c, c2 = torch.randperm(colours, generator=g)[:2].tolist()
        s, s2 = torch.randperm(shapes, generator=g)[:2].tolist()
        other = (int(torch.randint(colours, (1,), generator=g)), s2)
        pairs = [(c, s), (c, s2), (c2, s), other if other != (c, s) else (c2, s2)]
        perm = torch.randperm(4, generator=g).tolist()
        pairs = [pairs[p] for p in perm]
        emb.append(torch.stack([torch.cat([torch.eye(colours)[a], torch.eye(shapes)[b]]) / 2**0.5 for a, b in pairs]))
        boxes.append(torch.rand(4, 2, generator=g).mul(0.8).add(0.1).repeat(1, 2) * torch.tensor([1, 1, 0.1, 0.1]))
        positive.append(pairs.index((c, s)))
        states.append(torch.stack([words[c], words[colours + s]]))
        text_emb.append(torch.cat([torch.eye(colours)[c], torch.zeros(shapes)]))
        contents.append(pairs)
    rs = RerankSet(
        image_ids=[f"img{i}" for i in range(n)], emb=torch.stack(emb), boxes=torch.stack(boxes),
        objectness=torch.ones(n, 4), mask=torch.ones(n, 4, dtype=torch.bool), groups=torch.zeros(n, dtype=torch.long),
        token_states=torch.stack(states), token_mask=torch.ones(n, 2, dtype=torch.long), text_emb=torch.stack(text_emb),
        text_image=torch.arange(n), positive=torch.tensor(positive),
    )  # fmt: skip
    return rs, contents


def test_weak_reranker_learns_to_localize_from_images_alone() -> None:
    torch.manual_seed(0)
    world, contents = _conjunction_world(256, seed=1)
    held_out, _ = _conjunction_world(128, seed=2)
    referents = [pairs[int(k)] for pairs, k in zip(contents, world.positive)]
    # What a weak run has: the expression and its image, no slot. Negatives: images that do
    # not hold (c, s), the ones with colour c first (what the dual encoder would hand over).
    weak = replace(world, positive=torch.full_like(world.positive, -1), weak=True)
    holds = torch.tensor([[ref in pairs for pairs in contents] for ref in referents])  # [T, N]
    colour_match = torch.einsum("td,nkd->tnk", world.text_emb, world.emb).amax(dim=2) > 0
    rank = colour_match.float() + torch.rand(holds.shape, generator=torch.Generator().manual_seed(3))
    negatives = rank.masked_fill(holds, -1.0).topk(3, dim=1).indices
    assert not bool(holds.gather(1, negatives).any())
    rr = RelationReranker(RerankSpec(hidden_size=32, num_relations=2, input_dropout=0.0), text_hidden=8, embed_dim=8)
    before = _own_image_accuracy(rr, held_out)
    assert before <= 0.65  # the colour ties the referent with its half match
    opt = torch.optim.AdamW(rr.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(weak.num_texts, (32,), generator=gen)
        losses = rerank_loss(rr, weak, idx, negatives[idx], 5.0, 0.0)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert float(losses["rerank_acc"]) >= 0.9  # the own image wins among its look-alikes
    assert _own_image_accuracy(rr, held_out) >= 0.9  # and within it, the referent: never told which


def test_stage_rerank_names_a_weak_row_and_weak_rerank_keeps_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from reir.data.synth import generate
    from reir.model import create_model

    data = tmp_path / "data"
    generate(data, num_images=6, test_fraction=0.34, image_size=64, seed=5, discovery_queries=0)
    samples = [replace(s, refs=[(t, NO_REFERENT) for t, _ in s.refs]) for s in load_samples(data, "train")]
    groups = negative_groups(data, "train", [s.image_id for s in samples])
    model, processor = create_model(str(tiny_checkpoint))
    load = lambda p: Image.open(p).convert("RGB")
    with pytest.raises(ValueError, match=f"of image {samples[0].image_id!r} has no referent box.*weak-rerank"):
        build_rerank_set(model, processor, samples, groups, load, top_k=5, min_iou=0.0)
    rs = build_rerank_set(model, processor, samples, groups, load, top_k=5, min_iou=1.0, weak=True)
    assert rs.weak and rs.num_texts == sum(len(s.refs) for s in samples) and rs.skipped == 0  # no IoU test
    assert bool((rs.positive == NO_REFERENT).all())
    losses = rerank_loss(model.add_reranker(), rs, torch.arange(rs.num_texts), mine_hard_negatives(rs, 2), 5.0, 0.0)
    assert torch.isfinite(losses["loss"].detach()) and float(losses["loss_rerank_ce"].detach()) > 0


def test_batches_come_from_one_group_each_and_cover_every_group() -> None:
    rs = _relation_world(40, seed=4)
    rs.groups = torch.tensor([0] * 10 + [1] * 30)
    pool = torch.arange(40)[torch.arange(40) % 5 != 4]  # some expressions held out
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(200):
        idx = sample_texts(rs, pool, 8, gen)
        groups = rs.groups[rs.text_image[idx]].unique()
        assert idx.shape == (8,) and groups.numel() == 1 and bool(torch.isin(idx, pool).all())
        seen.append(int(groups))
    # groups drawn in proportion to their expressions: about a quarter of batches from group 0
    assert 0.1 < seen.count(0) / len(seen) < 0.4


def test_hard_negatives_stay_in_the_group_and_skip_the_own_image() -> None:
    rs = _relation_world(12, seed=3)
    rs.groups = torch.tensor([0] * 6 + [1] * 6)
    neg = mine_hard_negatives(rs, 8)
    assert neg.shape == (12, 8)
    for t in range(12):
        chosen = [int(i) for i in neg[t] if i >= 0]
        assert len(chosen) == 5 and t not in chosen
        assert all(int(rs.groups[i]) == int(rs.groups[t]) for i in chosen)
    assert (neg[:, 5:] == -1).all()  # padding where the group has no more images


def test_hard_negatives_are_each_groups_best_scored_images() -> None:
    """Against the plain definition: every image of the expression's group but its own,
    ranked by its best stored instance's similarity (an image without any last)."""
    g = torch.Generator().manual_seed(4)
    n, m, dim, t = 30, 5, 8, 90
    emb = torch.nn.functional.normalize(torch.randn(n, m, dim, generator=g), dim=-1)
    mask = torch.rand(n, m, generator=g) < 0.7
    mask[3] = False  # an image with nothing stored
    groups = torch.tensor([0] * 12 + [1] * 10 + [2] * 7 + [3])  # the last group: one image alone
    text_image = torch.randint(n, (t,), generator=g)
    rs = RerankSet(image_ids=[f"i{i}" for i in range(n)], emb=emb, boxes=torch.rand(n, m, 4, generator=g),
                   objectness=torch.ones(n, m), mask=mask, groups=groups, token_states=torch.zeros(t, 2, 4),
                   token_mask=torch.ones(t, 2, dtype=torch.long), text_emb=torch.randn(t, dim, generator=g),
                   text_image=text_image, positive=torch.zeros(t, dtype=torch.long))  # fmt: skip
    neg = mine_hard_negatives(rs, 9, chunk=7)
    best = torch.einsum("td,nkd->tnk", rs.text_emb, emb).masked_fill(~mask[None], -2.0).amax(dim=2)
    for row in range(t):
        own = int(text_image[row])
        others = [i for i in range(n) if int(groups[i]) == int(groups[own]) and i != own]
        want = sorted(others, key=lambda i: -float(best[row, i]))[:9]
        got = [int(i) for i in neg[row] if i >= 0]
        assert got == want, row
        assert (neg[row, len(got):] == -1).all()


def test_negatives_drawn_from_the_pool_cover_it_real_images_first() -> None:
    rs = _relation_world(12, seed=3)
    rs.groups = torch.tensor([0] * 6 + [1] * 6)
    pool = mine_hard_negatives(rs, 8)  # 5 real images per row, then padding
    gen = torch.Generator().manual_seed(0)
    assert draw_negatives(pool, 8, gen) is pool  # no wider pool: always the hardest
    seen: set[tuple[int, int]] = set()
    for _ in range(30):
        drawn = draw_negatives(pool, 3, gen)
        assert drawn.shape == (12, 3) and (drawn >= 0).all()  # real images before padding
        for t in range(12):
            row = drawn[t].tolist()
            assert len(set(row)) == 3 and set(row) <= set(pool[t].tolist())
            seen.update((t, i) for i in row)
    assert seen == {(t, int(i)) for t in range(12) for i in pool[t] if i >= 0}  # every pooled image comes up
    assert (draw_negatives(pool, 6, gen) == -1).sum(dim=1).tolist() == [1] * 12  # only 5 real: one pad each


def test_build_rerank_set_from_a_synthetic_benchmark(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from reir.data.synth import generate
    from reir.model import create_model

    data = tmp_path / "data"
    generate(data, num_images=12, test_fraction=0.25, image_size=64, seed=5, discovery_queries=0)
    samples = load_samples(data, "train")
    groups = negative_groups(data, "train", [s.image_id for s in samples])
    model, processor = create_model(str(tiny_checkpoint))
    rs = build_rerank_set(model, processor, samples, groups, lambda p: Image.open(p).convert("RGB"),
                          top_k=5, min_iou=0.0)  # fmt: skip
    n_refs = sum(len(s.refs) for s in samples)
    assert rs.emb.shape == (len(samples), 5, model.config.embed_dim)
    assert rs.num_texts + rs.skipped == n_refs and rs.num_texts == n_refs  # min_iou 0: every referent usable
    assert rs.token_states.shape[:2] == rs.token_mask.shape and rs.token_states.shape[0] == rs.num_texts
    assert bool(rs.mask.any(dim=1).all())
    assert torch.allclose(rs.emb[rs.mask].norm(dim=-1), torch.ones(int(rs.mask.sum())), atol=1e-4)
    strict = build_rerank_set(model, processor, samples, groups, lambda p: Image.open(p).convert("RGB"),
                              top_k=5, min_iou=1.0)  # fmt: skip
    assert strict.num_texts == 0 and strict.skipped == n_refs  # an untrained model never fits a box exactly


def test_texts_encoded_in_batches_of_similar_length_come_back_in_order(tiny_checkpoint: Path) -> None:
    from reir.model import create_model
    from reir.training.rerank import encode_texts

    model, processor = create_model(str(tiny_checkpoint))
    model.eval()
    words = ["red", "circle", "left", "of", "the", "blue", "square", "on", "a", "striped", "background"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(k),), generator=g))
             for k in torch.randint(1, 12, (300,), generator=g)]  # more than one batch of 256
    states, mask, emb = encode_texts(model, processor, texts)
    assert states.shape[:2] == mask.shape and emb.shape == (300, model.config.embed_dim)
    for i in (0, 7, 150, 299):  # each row is its own text's, encoded alone
        alone_states, alone_mask, alone_emb = encode_texts(model, processor, [texts[i]])
        n = int(alone_mask.sum())
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(emb[i], alone_emb[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states[i, :n], alone_states[0, :n], atol=1e-4, rtol=1e-4)
    assert encode_texts(model, processor, [])[0].shape[0] == 0


@pytest.mark.parametrize("scope,expected", [("gallery", {0}), (None, None)])
def test_negative_groups_follow_the_benchmark_scope(tmp_path: Path, scope: str | None, expected: set[int] | None) -> None:
    import json

    ids = [f"syn{i:06d}" for i in range(5)]
    if scope:
        (tmp_path / "meta.json").write_text(json.dumps({"splits": {"test": {"matches_scope": scope}}}))
    groups = negative_groups(tmp_path, "test", ids)
    assert set(groups) == expected if expected is not None else groups == list(range(5))
    (tmp_path / "meta.json").write_text(json.dumps({"splits": {"train": {"chunk_size": 2, "matches_scope": "x"}}}))
    assert negative_groups(tmp_path, "train", list(reversed(ids))) == [2, 1, 1, 0, 0]


def test_calibration_holds_out_whole_images() -> None:
    text_image = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 7, 8, 9, 9, 10, 11, 11, 12, 13])  # 20 expressions
    train, held = calibration_split(text_image, 4)
    assert sorted(train.tolist() + held.tolist()) == list(range(20))  # a partition
    assert set(text_image[held].tolist()) == {3, 7, 11}  # every 4th image, all of its expressions
    assert not set(text_image[train].tolist()) & {3, 7, 11}
    _, held20 = calibration_split(text_image, 20)
    assert held20.numel() == 0  # too few expressions to hold any out
    train0, held0 = calibration_split(text_image, 0)
    assert held0.numel() == 0 and train0.tolist() == list(range(20))
    with pytest.raises(ValueError, match="every 1"):
        calibration_split(text_image, 1)


def test_the_rerank_stages_time_budget_is_one_total_for_both_phases() -> None:
    from reir.training.trainer import PRESENCE_STEP_COST, first_phase_budget

    # 1,800 re-ranker and 1,000 presence steps at half the cost: the re-ranker's 1,800 of 2,300
    assert first_phase_budget(960.0, 1800, PRESENCE_STEP_COST * 1000) == pytest.approx(960.0 * 1800 / 2300)
    assert first_phase_budget(960.0, 1800, 0) == 960.0  # without discovery queries it has it all
    assert first_phase_budget(None, 1800, 500) is None
