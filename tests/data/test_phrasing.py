"""Phrasing families and surface noise: same meaning in every surface form.

Checked for every family on many expressions (planner-made ones from a generated
gallery, and random valid ones up to three details): every content word of the
meaning is said and nothing else (``mentioned == meaning_words``), the text stays in
the vocabulary and the token budget, flips mirror it exactly, and a generated benchmark
keeps held-out families out of training and describes each test referent both ways.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reir.data import referring
from reir.data.families import FAMILIES
from reir.data.language import parse
from reir.data.noise import (
    DEFAULT_NOISE,
    FILLER_WORDS,
    KEY_WORDS,
    NO_NOISE,
    SPATIAL_WORDS,
    TOKEN_LIMIT,
    add_filler,
    add_noise,
    count_tokens,
)
from reir.data.phrasing import (
    HELDOUT_FAMILIES,
    MAX_TOKENS,
    TRAIN_FAMILIES,
    TRAIN_PHRASINGS_PER_EXPR,
    canonical_words,
    describe_test,
    describe_train,
    meaning_words,
    mentioned,
    phrasing_meta,
    render_family,
)
from reir.data.semantics import Expr, Relation, Thing
from reir.data.synth import generate, load_gallery
from reir.data.vocab import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES, SUPERLATIVES, VOCABULARY

_DETAILS = ("size", "superlative", "relation", "background", "context")
_LR = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost",
       "second_leftmost": "second_rightmost", "second_rightmost": "second_leftmost",
       "pair_leftmost": "pair_rightmost", "pair_rightmost": "pair_leftmost"}
_TB = {"above": "below", "below": "above", "topmost": "bottommost", "bottommost": "topmost",
       "second_topmost": "second_bottommost", "second_bottommost": "second_topmost",
       "pair_topmost": "pair_bottommost", "pair_bottommost": "pair_topmost"}
_BAD_GRAMMAR = re.compile(r"\b(a|an|the) (a|an|the)\b|\ba [aeiou]|\ban [^aeiou]|  | ,|,,|^ | $")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _thing(rng: np.random.Generator) -> Thing:
    return Thing(_pick(rng, SHAPES), _pick(rng, COLORS) if rng.random() < 0.7 else None)


def _random_expr(rng: np.random.Generator) -> Expr:
    """A valid Expr with at most three details (the planner's limit), any combination."""
    while True:
        fields: dict[str, Any] = {"shape": _pick(rng, SHAPES) if rng.random() < 0.8 else None}
        fields["color"] = _pick(rng, COLORS) if rng.random() < 0.8 or fields["shape"] is None else None
        fields["size"] = _pick(rng, SIZES) if rng.random() < 0.4 else None
        fields["superlative"] = _pick(rng, SUPERLATIVES) if rng.random() < 0.3 else None
        fields["relation"] = Relation(_pick(rng, RELATIONS), _thing(rng)) if rng.random() < 0.4 else None
        fields["background"] = _pick(rng, BACKGROUNDS) if rng.random() < 0.4 else None
        fields["context"] = _thing(rng) if rng.random() < 0.4 else None
        if sum(fields[k] is not None for k in _DETAILS) > 3:
            continue
        try:
            return Expr(**fields)
        except ValueError:
            continue


@pytest.fixture(scope="module")
def exprs(synth_root: Path) -> list[Expr]:
    rng = np.random.default_rng(11)
    out = [_random_expr(rng) for _ in range(300)] + [referring.random_discovery_expr(rng) for _ in range(60)]
    planner = referring.TestPlanner(load_gallery(synth_root, "test"))
    for s, scene in enumerate(planner.gallery.scenes):
        out += [e for i in range(len(scene.objects)) if (e := planner.expression(s, i, rng)) is not None]
    return out


def _mirror(expr: Expr, table: dict[str, str]) -> Expr:
    rel = expr.relation and Relation(table.get(expr.relation.relation, expr.relation.relation), expr.relation.ref)
    sup = expr.superlative and table.get(expr.superlative, expr.superlative)
    return dataclasses.replace(expr, relation=rel, superlative=sup)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_says_the_whole_meaning_in_vocabulary(family: str, exprs: list[Expr]) -> None:
    rng = np.random.default_rng(0)
    vocab = set(VOCABULARY)
    for expr in exprs:
        for article in ("the", "a"):
            text = render_family(expr, family, rng, article)
            assert mentioned(text) == meaning_words(expr), (family, text, expr)
            assert set(re.findall(r"[a-z]+", text)) <= vocab, text
            assert text == text.lower() and not _BAD_GRAMMAR.search(text), text
            assert count_tokens(text) <= TOKEN_LIMIT, text


def test_template_family_is_the_parseable_template(exprs: list[Expr]) -> None:
    rng = np.random.default_rng(1)
    for expr in exprs:
        assert parse(render_family(expr, "template", rng)) == expr


def test_most_texts_fit_the_budget(exprs: list[Expr]) -> None:
    rng = np.random.default_rng(2)
    sizes = [count_tokens(render_family(e, f, rng)) for e in exprs for f in FAMILIES]
    assert np.mean(np.asarray(sizes) <= MAX_TOKENS) > 0.995


def test_families_differ_in_surface_order() -> None:
    expr = Expr(shape="circle", color="red", relation=Relation("left", Thing("square", "blue")), background="striped")
    texts = {f: render_family(expr, f, np.random.default_rng(3)) for f in FAMILIES}
    assert len(set(texts.values())) == len(FAMILIES), texts
    # the template names the noun first; fronted details come first (relation or background)
    assert texts["template"].index("circle") < texts["template"].index("left")
    assert min(texts["fronted"].find("left"), texts["fronted"].find("striped")) < texts["fronted"].index("circle")
    assert texts["question"].endswith("?") and not texts["imperative"].startswith("the ")
    assert texts["postnominal"].startswith("the circle") and re.search(r"\bone\b", texts["one_head"])
    assert not re.search(r"\b(the|a|an) (red|blue|circle|square|striped)", texts["terse"])  # no articles
    assert re.match(r"^(the )?red circle, (the )?one", texts["appositive"]), texts["appositive"]
    for family in FAMILIES:  # every family can say a shape-less head
        assert "red" in render_family(Expr(color="red", size="small"), family, np.random.default_rng(4))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flips_mirror_every_spatial_word(family: str, exprs: list[Expr]) -> None:
    from reir.model.processing import swap_left_right, swap_top_bottom

    spatial = [e for e in exprs if e.relation or e.superlative]
    assert {r.relation.relation for r in spatial if r.relation} == set(RELATIONS)
    for k, expr in enumerate(spatial):
        for swap, table in ((swap_left_right, _LR), (swap_top_bottom, _TB)):
            text = render_family(expr, family, np.random.default_rng(k))
            mirrored = render_family(_mirror(expr, table), family, np.random.default_rng(k))
            assert swap(text) == mirrored, (family, text, mirrored)
            assert swap(swap(text)) == text
            noisy = add_noise(text, np.random.default_rng(k))
            assert mentioned(swap(noisy)) == meaning_words(_mirror(expr, table)), noisy


def test_noise_never_hides_a_flip_word() -> None:
    from reir.model.processing import _LR_SWAP, _TB_SWAP

    assert set(_LR_SWAP) | set(_TB_SWAP) == SPATIAL_WORDS


def test_noise_keeps_meaning_and_is_deterministic(exprs: list[Expr]) -> None:
    rng = np.random.default_rng(5)
    vocab = set(VOCABULARY)
    changed = 0
    for expr in exprs:
        for family in FAMILIES:
            text = render_family(expr, family, rng)
            seed = int(rng.integers(1 << 30))
            noisy = add_noise(text, np.random.default_rng(seed))
            assert noisy == add_noise(text, np.random.default_rng(seed))
            assert add_noise(text, np.random.default_rng(seed), NO_NOISE) == text
            assert mentioned(noisy) == meaning_words(expr), (text, noisy)
            assert count_tokens(noisy) <= max(TOKEN_LIMIT, count_tokens(text)), noisy
            assert sum(w.strip(",.?:") not in vocab | {"coloured"} for w in noisy.lower().replace("-", " ").split()) <= 1, noisy
            assert set(canonical_words(noisy)) <= vocab, noisy
            changed += noisy != text
    share = changed / (len(exprs) * len(FAMILIES))
    assert 0.3 < share < 0.7, share  # moderate: most sentences stay as written


def test_filler_wraps_the_description_in_carrier_words_only(exprs: list[Expr]) -> None:
    rng = np.random.default_rng(8)
    assert not set(FILLER_WORDS) & (KEY_WORDS | SPATIAL_WORDS | set(SUPERLATIVES) | {"one", "not", "no", "image",
                                                                                     "picture", "background"})
    before, after, marks = 0, 0, 0
    for expr in exprs:
        text = add_noise(render_family(expr, _pick(rng, list(FAMILIES)), rng), rng)
        seed = int(rng.integers(1 << 30))
        out = add_filler(text, np.random.default_rng(seed))
        assert out == add_filler(text, np.random.default_rng(seed))
        if count_tokens(text) >= TOKEN_LIMIT:  # no room: left as it is
            assert out == text
            continue
        core = text.strip().rstrip(".?!")
        at = out.find(core)
        assert at > 0, (text, out)  # the description itself, in one piece, after at least one word
        head, tail = out[:at].split(), out[at + len(core):].strip(" .?!").split()
        assert set(head) | set(tail) <= set(FILLER_WORDS), out
        assert 1 <= len(head) <= 3 and len(tail) <= 2, out
        assert count_tokens(out) <= max(TOKEN_LIMIT, count_tokens(text)), out
        before, after, marks = before + len(head), after + bool(tail), marks + (out[-1] in ".?!" and text[-1] not in ".?!")
    assert after > 0.2 * len(exprs) and marks > 0.2 * len(exprs)  # words after and end marks both occur
    full = " ".join(["the red circle"] * 9)  # 27 tokens: room for three words at most
    assert count_tokens(add_filler(full, np.random.default_rng(0))) <= TOKEN_LIMIT


def test_describe_uses_distinct_families_and_texts() -> None:
    rng = np.random.default_rng(6)
    for _ in range(200):
        expr = _random_expr(rng)
        train = describe_train(expr, rng)
        assert len(train) == TRAIN_PHRASINGS_PER_EXPR
        assert len({f for f, _ in train}) == len(train) and {f for f, _ in train} <= set(TRAIN_FAMILIES)
        assert len({t for _, t in train}) == len(train)
        (f1, _), (f2, _) = describe_test(expr, rng)
        assert f1 in TRAIN_FAMILIES and f2 in HELDOUT_FAMILIES


def test_split_and_meta() -> None:
    assert set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(FAMILIES)
    assert not set(TRAIN_FAMILIES) & set(HELDOUT_FAMILIES) and len(FAMILIES) >= 10
    meta = phrasing_meta()
    assert meta["train_families"] == list(TRAIN_FAMILIES) and meta["heldout_families"] == list(HELDOUT_FAMILIES)
    assert meta["phrasings_per_train_expr"] == TRAIN_PHRASINGS_PER_EXPR
    assert meta["noise"] == DEFAULT_NOISE.as_dict()
    json.dumps(meta)


def _entries(root: Path) -> list[dict[str, Any]]:
    return json.loads((root / "reircoco.json").read_text())


def test_generated_benchmark_keeps_held_out_families_for_test(tmp_path: Path) -> None:
    a = Path(generate(tmp_path / "a", num_images=60, seed=5, discovery_queries=8).out_dir)
    entries = _entries(a)
    train = [s for e in entries if e["split"] == "train" for s in e["sentences"]]
    assert train and {s["family"] for s in train} <= set(TRAIN_FAMILIES)
    assert len({s["family"] for s in train}) == len(TRAIN_FAMILIES)  # all are used
    for entry in (e for e in entries if e["split"] == "train"):
        by_program: dict[str, list[str]] = {}
        for s in entry["sentences"]:
            by_program.setdefault(json.dumps(s["program"], sort_keys=True), []).append(s["family"])
        assert all(len(f) == len(set(f)) == TRAIN_PHRASINGS_PER_EXPR for f in by_program.values())
    tests = [e for e in entries if e["split"] == "test"]
    assert tests
    for entry in tests:
        families = [s["family"] for s in entry["sentences"]]
        assert len(families) == 2 and families[0] in TRAIN_FAMILIES and families[1] in HELDOUT_FAMILIES
        assert entry["sentences"][0]["program"] == entry["sentences"][1]["program"]
        assert entry["sentences"][0]["matches"] == entry["sentences"][1]["matches"]
    queries = json.loads((a / "discovery.json").read_text())["queries"]
    assert queries and all(q["family"] in FAMILIES for q in queries)
    b = Path(generate(tmp_path / "b", num_images=60, seed=5, discovery_queries=8).out_dir)
    for name in ("reircoco.json", "discovery.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
