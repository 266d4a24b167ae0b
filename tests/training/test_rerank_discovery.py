"""Stage ``rerank``'s discovery objective: training discovery queries label every stored
instance of their group, the presence loss learns "does this image hold it" for generic
queries with many matches or none, and the threshold is calibrated the way discover mode
is scored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from reir.data.formats import load_discovery, load_samples, negative_groups
from reir.model.rerank import RelationReranker, RerankSpec
from reir.training.rerank import (
    DISCOVERY_IGNORE,
    DISCOVERY_NEG,
    DISCOVERY_OUT,
    DISCOVERY_POS,
    DiscoverySet,
    RerankSet,
    build_discovery_set,
    build_rerank_set,
    calibrate_discovery,
    calibration_split,
    discovery_loss,
    discovery_rows,
    sample_discovery,
)

COLOURS = SHAPES = 4


def _presence_world(seed: int) -> tuple[RerankSet, DiscoverySet]:
    """Two groups of 60 images with 4 (colour, shape) instances each; group g never holds the
    pairs with ``(c + s) % 4 == g``, so a query for such a pair has no match there and many in
    the other group. Queries name a pair; the dual encoder reads the colour only."""
    g = torch.Generator().manual_seed(seed)
    n, k = 120, 4
    words = torch.randn(COLOURS + SHAPES, 8, generator=torch.Generator().manual_seed(0))
    groups = torch.arange(n) // 60
    emb, boxes, pairs = [], [], []
    for i in range(n):
        allowed = [(c, s) for c in range(COLOURS) for s in range(SHAPES) if (c + s) % 4 != int(groups[i])]
        chosen = [allowed[j] for j in torch.randperm(len(allowed), generator=g)[:k].tolist()]
        emb.append(torch.stack([torch.cat([torch.eye(COLOURS)[c], torch.eye(SHAPES)[s]]) / 2**0.5 for c, s in chosen]))
        boxes.append(torch.rand(k, 2, generator=g).mul(0.8).add(0.1).repeat(1, 2) * torch.tensor([1, 1, 0.1, 0.1]))
        pairs.append(chosen)
    rs = RerankSet(
        image_ids=[f"img{i}" for i in range(n)], emb=torch.stack(emb), boxes=torch.stack(boxes),
        objectness=torch.ones(n, k), mask=torch.ones(n, k, dtype=torch.bool), groups=groups,
        token_states=torch.zeros(0, 2, 8), token_mask=torch.zeros(0, 2, dtype=torch.long), text_emb=torch.zeros(0, 8),
        text_image=torch.zeros(0, dtype=torch.long), positive=torch.zeros(0, dtype=torch.long),
    )  # fmt: skip
    # Each pair once per group, side by side: a held-out query's words were trained in the other group.
    queries = [(c, s, grp) for c in range(COLOURS) for s in range(SHAPES) for grp in (0, 1)]
    q = len(queries)
    labels = torch.full((q, n, k), DISCOVERY_OUT, dtype=torch.int8)
    truth = torch.zeros(q, n, dtype=torch.bool)
    for qi, (c, s, grp) in enumerate(queries):
        for i in range(n):
            if int(groups[i]) != grp:
                continue
            labels[qi, i] = torch.tensor([DISCOVERY_POS if p == (c, s) else DISCOVERY_NEG for p in pairs[i]])
            truth[qi, i] = (c, s) in pairs[i]
    text_emb = torch.stack([torch.cat([torch.eye(COLOURS)[c], torch.zeros(SHAPES)]) / 2**0.5 for c, _, _ in queries])
    colour = torch.einsum("qd,nkd->qnk", text_emb, rs.emb).amax(dim=2)
    scope = torch.stack([groups == grp for _, _, grp in queries])
    hard = colour.masked_fill(~scope | truth, -3.0).topk(30, dim=1)
    hard_idx = hard.indices.masked_fill(hard.values <= -3.0, -1)
    ds = DiscoverySet(
        token_states=torch.stack([torch.stack([words[c], words[COLOURS + s]]) for c, s, _ in queries]),
        token_mask=torch.ones(q, 2, dtype=torch.long), text_emb=text_emb, group=torch.tensor([x[2] for x in queries]),
        labels=labels, truth=truth, hard=hard_idx,
    )  # fmt: skip
    return rs, ds


def test_presence_loss_learns_to_find_every_matching_image_and_none() -> None:
    torch.manual_seed(0)
    rs, ds = _presence_world(1)
    empty = ~ds.truth.any(dim=1)
    assert int(empty.sum()) == 8 and int(ds.truth.sum(dim=1).max()) >= 10  # none, and many matches
    train, held = calibration_split(torch.arange(ds.num_queries), 4)
    assert sorted(train.tolist() + held.tolist()) == list(range(ds.num_queries)) and bool(empty[held].any())
    rr = RelationReranker(RerankSpec(hidden_size=32, num_relations=2, input_dropout=0.0), text_hidden=8,
                          embed_dim=COLOURS + SHAPES)  # fmt: skip
    before = calibrate_discovery(rr, rs, ds, held, 5.0, 0.0)
    opt = torch.optim.AdamW(rr.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        q, imgs = sample_discovery(ds, train, 8, 12, gen)
        assert bool((ds.group[q] == ds.group[q[0]]).all())  # one group per batch
        rows = imgs[imgs >= 0]
        assert bool((rs.groups[rows] == ds.group[q[0]]).all())  # every image in the queries' group
        losses = discovery_loss(rr, rs, ds, q, imgs, 5.0, 0.0)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    after = calibrate_discovery(rr, rs, ds, held, 5.0, 0.0)
    assert before["f1"] < 0.6  # the colour alone: half the answers are the wrong shape
    assert after["f1"] >= 0.85 and after["none_accuracy"] >= 0.5, after  # 2 empty held-out queries
    # The query-level gate never answers more than the threshold alone; a target of 1 silences every
    # empty held-out query, and the figures reported are those with the gate.
    assert after["discover_gate"] >= after["discover_threshold"]
    assert after["none_accuracy"] >= after["none_accuracy_without_gate"]
    strict = calibrate_discovery(rr, rs, ds, held, 5.0, 0.0, none_target=1.0)
    assert strict["none_accuracy"] == 1.0 and strict["none_target"] == 1.0
    assert strict["discover_threshold"] == after["discover_threshold"] and strict["recall"] <= after["recall"]
    assert 0.0 < after["discover_threshold"] < 1.0 and after["num_queries"] == held.numel()


def test_discovery_rows_keep_queries_complete_over_a_training_group(tmp_path: Path) -> None:
    from reir.data.records import DiscoveryQuery, Match

    ids, groups = ["a", "b", "c", "d"], [0, 0, 1, 1]
    queries = [
        DiscoveryQuery("t0", "red one", "train", [Match("a", 1, [0, 0, 4, 4]), Match("b", 2, [1, 1, 4, 4])], group=0),
        DiscoveryQuery("t1", "none here", "train", [], group=1),
        DiscoveryQuery("t2", "spans groups", "train", [Match("a", 1, [0, 0, 4, 4]), Match("c", 3, [0, 0, 2, 2])],
                       group=0),
        DiscoveryQuery("t3", "no group", "train", [Match("a", 1, [0, 0, 4, 4])]),
        DiscoveryQuery("t4", "a test query", "test", [], group=0),
        DiscoveryQuery("t5", "group not here", "train", [], group=7),
    ]  # fmt: skip
    texts, per_image = discovery_rows(queries, ids, groups)
    assert texts == [{"raw": "red one", "group": 0}, {"raw": "none here", "group": 1}]
    assert per_image == {"a": [[0, [0.0, 0.0, 4.0, 4.0]]], "b": [[0, [1.0, 1.0, 4.0, 4.0]]]}


def test_build_discovery_set_labels_stored_instances_of_the_group(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from dataclasses import replace

    from reir.data.synth import generate
    from reir.model import create_model
    from reir.training.rerank import _cxcywh_norm

    data = tmp_path / "data"
    generate(data, num_images=24, test_fraction=0.25, image_size=64, seed=5, discovery_queries=0,
             train_discovery_queries=6)  # fmt: skip
    samples = load_samples(data, "train")
    ids = [s.image_id for s in samples]
    groups = negative_groups(data, "train", ids)
    model, processor = create_model(str(tiny_checkpoint))
    rs = build_rerank_set(model, processor, samples, groups, lambda p: Image.open(p).convert("RGB"), top_k=4)
    texts, per_image = discovery_rows(load_discovery(data), ids, groups)
    assert len(texts) == 6 * len(set(groups))
    # One match stored exactly (slot 0), one near miss (slot 1 shifted: ignored), the rest as detected.
    row = next(i for i, s in enumerate(samples) if per_image.get(s.image_id))
    qi, box = per_image[ids[row]][0]
    exact = _cxcywh_norm([box], samples[row].width, samples[row].height)[0]
    boxes = rs.boxes.clone()
    boxes[row, 0] = exact
    boxes[row, 1] = exact + torch.tensor([exact[2] * 0.6, 0.0, 0.0, 0.0])
    rs = replace(rs, boxes=boxes)
    ds = build_discovery_set(model, processor, rs, texts, [per_image.get(i, []) for i in ids],
                             [(s.width, s.height) for s in samples])  # fmt: skip
    n, k = rs.mask.shape
    assert ds.labels.shape == (len(texts), n, k) and ds.token_states.shape[0] == len(texts)
    assert int(ds.labels[qi, row, 0]) == DISCOVERY_POS and int(ds.labels[qi, row, 1]) == DISCOVERY_IGNORE
    assert bool(ds.truth[qi, row])
    scope = ds.group[:, None] == rs.groups[None, :]
    assert bool((ds.labels[~scope] == DISCOVERY_OUT).all())  # other groups are out of scope
    assert bool((ds.labels[scope[:, :, None] & rs.mask[None]] >= DISCOVERY_IGNORE).all())
    assert bool((ds.labels[:, ~rs.mask] == DISCOVERY_OUT).all())  # no stored instance, no label
    assert not bool((ds.labels == DISCOVERY_POS).any(dim=2)[~ds.truth].any())  # positives only in matching images
    for q in range(len(texts)):
        hard = ds.hard[q][ds.hard[q] >= 0]
        assert bool((rs.groups[hard] == ds.group[q]).all()) and not bool(ds.truth[q, hard].any())
    assert int((ds.labels == DISCOVERY_NEG).sum()) > 0


@pytest.mark.parametrize("image_term", [False, True])
def test_the_presence_head_starts_from_the_reranker_serves_discover_mode_and_is_saved(
    tmp_path: Path, tiny_checkpoint: Path, image_term: bool
) -> None:
    from reir.model import create_model

    model, processor = create_model(str(tiny_checkpoint))
    if model.reranker is None:
        model.add_reranker(hidden_size=16)
    assert model.presence is None
    presence = model.add_presence(image_term=image_term)
    own = presence.state_dict()
    copied = model.reranker.state_dict()
    assert all(torch.equal(own[k], v) for k, v in copied.items())
    assert sorted(set(own) - set(copied)) == (["image_proj.bias", "image_proj.weight", "image_query",
                                               "image_value.bias", "image_value.weight"] if image_term else [])
    assert model.config.presence_spec.image_term is image_term
    text = processor.text(["a red circle"])
    n, m, d = 3, 4, model.config.embed_dim
    emb = torch.nn.functional.normalize(torch.randn(n, m, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    boxes, objectness, mask = torch.rand(n, m, 4) * 0.5 + 0.1, torch.ones(n, m), torch.ones(n, m, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        args = (text["input_ids"], text["attention_mask"], emb, boxes, objectness, mask)
        rank = model.rerank_logits(*args)
        assert torch.allclose(model.rerank_logits(*args, presence=True), rank)  # a copy, until trained
        for p in model.presence.parameters():
            p.add_(0.05 * torch.randn_like(p))
        found = model.rerank_logits(*args, presence=True)
        assert not torch.allclose(found, rank) and torch.allclose(model.rerank_logits(*args), rank)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, _ = create_model(str(tmp_path / "m"))
    assert loaded.presence is not None and loaded.presence.spec.image_term is image_term
    with torch.no_grad():
        assert torch.allclose(loaded.rerank_logits(*args, presence=True), found, atol=1e-5)
        assert torch.allclose(loaded.rerank_logits(*args), rank, atol=1e-5)


def test_the_image_term_scores_the_mean_of_the_images_stored_instances() -> None:
    """The presence head's image-level term: one value per (expression, image), the expression's
    image slot against the projected mean of the image's stored vectors (padding left out); zero
    until trained, so a head copied from the re-ranker starts where the re-ranker is."""
    torch.manual_seed(0)
    spec = RerankSpec(hidden_size=16, num_relations=2, input_dropout=0.0)
    plain = RelationReranker(spec, text_hidden=8, embed_dim=8).eval()
    with_term = RelationReranker(RerankSpec(**{**spec.__dict__, "image_term": True}), text_hidden=8, embed_dim=8).eval()
    missing, unexpected = with_term.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["image_proj.bias", "image_proj.weight", "image_query",
                                                  "image_value.bias", "image_value.weight"]
    n, m = 3, 4
    states, tmask = torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.long)
    emb, boxes, obj = torch.randn(n, m, 8), torch.rand(n, m, 4) * 0.5 + 0.1, torch.rand(n, m)
    mask = torch.ones(n, m, dtype=torch.bool)
    mask[1, 3] = False  # image 1 holds three instances
    base, rows = torch.randn(n, m), torch.zeros(n, dtype=torch.long)
    args = (states, tmask, base, emb, boxes, obj, mask, rows)
    with torch.no_grad():
        assert torch.equal(with_term(*args), plain(*args))  # zero at the start
        with_term.image_value.weight.normal_()
        with_term.image_value.bias.normal_()
        got = with_term(*args) - plain(*args)
        image = with_term.text_slots(states, tmask)[2][0]  # [h]
        for i in range(n):
            mean = with_term.image_proj(emb[i][mask[i]].mean(dim=0))
            want = float(image @ mean) / 16**0.5
            assert torch.allclose(got[i][mask[i]], torch.full((int(mask[i].sum()),), want), atol=1e-5)
        assert got[0, 0] != got[2, 0]  # other instances, another value
        emb[1, 3] = 100.0  # what is stored in a padded slot changes nothing
        assert torch.allclose(with_term(*args) - plain(*args), got, equal_nan=True)
