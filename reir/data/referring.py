"""Choosing referring expressions for targets, for both splits and for discovery.

An expression is a head (color and/or shape) plus "details" (size, relation,
superlative, background, context), each a partial :class:`Expr`. The truth of a
conjunction is the minimum of its conjuncts, so per-candidate truths of each detail
are folded into two bitmasks (YES, not-NO) and a combination is tested with two
ANDs. Every accepted expression is re-checked with the full evaluator.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from reir.data.language import render
from reir.data.semantics import (
    MAYBE,
    NO,
    YES,
    Expr,
    Gallery,
    Relation,
    Scene,
    Thing,
    evaluate,
    head_matches,
    is_unique_referent,
    relation_truth,
    within_image_unique,
)
from reir.data.vocab import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES, SUPERLATIVES

MAX_TEST_WORDS = 20
MAX_DETAILS = 3


@dataclass(frozen=True)
class _Detail:
    fields: tuple[tuple[str, Any], ...]  # Expr keyword arguments
    yes: int  # bit k set: candidate k is YES
    live: int  # bit k set: candidate k is not NO
    words: int  # words this detail adds to the sentence

    @property
    def keys(self) -> set[str]:
        return {k for k, _ in self.fields}


def _masks(truths: list[int]) -> tuple[int, int]:
    yes = live = 0
    for k, t in enumerate(truths):
        if t == YES:
            yes |= 1 << k
        if t != NO:
            live |= 1 << k
    return yes, live


def _unique_things(scene: Scene, i: int) -> list[Thing]:
    """Noun phrases that name exactly one other object of the image ("the red square")."""
    out = []
    for j, o in enumerate(scene.objects):
        if j == i:
            continue
        for thing in (Thing(o.shape, o.color), Thing(o.shape)):
            hits = [k for k, p in enumerate(scene.objects) if head_matches(p, thing.shape, thing.color)]
            if hits == [j]:
                out.append(thing)
    return out


def detail_fields(scene: Scene, i: int, *, context: bool = True) -> list[dict[str, Any]]:
    """Every detail that might hold for object ``i`` (truth is checked later)."""
    obj = scene.objects[i]
    out: list[dict[str, Any]] = [{"size": obj.size}, {"background": scene.background}]
    out += [{"superlative": kind} for kind in SUPERLATIVES]
    for thing in _unique_things(scene, i):
        j = next(k for k, o in enumerate(scene.objects) if k != i and head_matches(o, thing.shape, thing.color))
        for rel in RELATIONS:
            if relation_truth(obj, scene.objects[j], rel, scene.width, scene.height) == YES:
                out.append({"relation": Relation(rel, thing)})
    if context:
        others = {Thing(o.shape, o.color) for k, o in enumerate(scene.objects) if k != i}
        out += [{"context": t} for t in sorted(others, key=lambda t: (t.shape, t.color or ""))]
    return out


def _details(head: dict[str, Any], fields_list: list[dict[str, Any]], evaluate_all: Any, pos: int) -> list[_Detail]:
    """Details that are YES for the target, with masks over the candidates."""
    base_words = len(render(Expr(**head)).split())
    out = []
    for fields in fields_list:
        try:
            expr = Expr(**head, **fields)
        except ValueError:
            continue
        truths = evaluate_all(expr)
        if truths[pos] != YES:
            continue
        yes, live = _masks(truths)
        words = len(render(expr).split()) - base_words
        out.append(_Detail(tuple(sorted(fields.items())), yes, live, words))
    return out


def _compatible(combo: tuple[_Detail, ...]) -> bool:
    keys = [d.keys for d in combo]
    if sum(len(k) for k in keys) != len(set().union(*keys)):
        return False
    merged = set().union(*keys)
    # Positional superlatives were evaluated without the size word: keep them apart.
    return not ("superlative" in merged and ("relation" in merged or "size" in merged))


def _combos(details: list[_Detail], max_details: int) -> list[tuple[_Detail, ...]]:
    out: list[tuple[_Detail, ...]] = [()]
    for n in range(1, max_details + 1):
        out += [c for c in itertools.combinations(details, n) if _compatible(c)]
    return out


def _build(head: dict[str, Any], combo: tuple[_Detail, ...]) -> Expr:
    kwargs = dict(head)
    for d in combo:
        kwargs.update(dict(d.fields))
    return Expr(**kwargs)


def test_expression(gallery: Gallery, s: int, i: int, rng: np.random.Generator) -> Expr | None:
    """Shortest (with random ties) expression naming (s, i) uniquely in the gallery."""
    scene = gallery.scenes[s]
    obj = scene.objects[i]
    head = {"shape": obj.shape, "color": obj.color}
    cands = gallery.candidates(Expr(**head))
    pos = cands.index((s, i))

    def evaluate_all(expr: Expr) -> list[int]:
        return [evaluate(expr, gallery.scenes[cs], ci) for cs, ci in cands]

    details = _details(head, detail_fields(scene, i), evaluate_all, pos)
    all_live = (1 << len(cands)) - 1
    scored = []
    for combo in _combos(details, MAX_DETAILS):
        words = sum(d.words for d in combo)
        if words <= MAX_TEST_WORDS:
            scored.append((words + 2.5 * rng.random(), combo))
    scored.sort(key=lambda x: x[0])
    for _, combo in scored:
        live = all_live
        for d in combo:
            live &= d.live
        if live == 1 << pos:
            expr = _build(head, combo)
            # Safety net: the bitmask shortcut must agree with the full evaluator.
            if is_unique_referent(gallery.truths(expr), s, i):
                return expr
    return None


def train_expressions(scene: Scene, i: int, rng: np.random.Generator, max_count: int = 3) -> list[Expr]:
    """Up to ``max_count`` different expressions naming object ``i`` uniquely in its image."""
    obj = scene.objects[i]
    heads = [{"shape": obj.shape, "color": obj.color}, {"shape": obj.shape}, {"color": obj.color}]
    n = len(scene.objects)
    found: list[tuple[float, Expr]] = []
    for head in heads:
        def evaluate_all(expr: Expr) -> list[int]:
            return [evaluate(expr, scene, j) for j in range(n)]

        fields = [f for f in detail_fields(scene, i, context=False) if "background" not in f]
        details = _details(head, fields, evaluate_all, i)
        for combo in _combos(details, 2):
            live = (1 << n) - 1
            for d in combo:
                live &= d.live
            if live == 1 << i:
                words = sum(d.words for d in combo)
                found.append((words + 3.0 * rng.random(), _build(head, combo)))
    found.sort(key=lambda x: x[0])
    chosen = [e for _, e in found[:max_count]]
    return [_decorate(scene, i, e, rng) for e in chosen]


def _decorate(scene: Scene, i: int, expr: Expr, rng: np.random.Generator) -> Expr:
    """Sometimes add image-level details: they never break within-image uniqueness, and
    they teach the words "on the striped background" / "in the image with ..."."""
    kwargs = expr.to_program()
    if rng.random() < 0.25:
        kwargs["background"] = scene.background
    others = [o for j, o in enumerate(scene.objects) if j != i]
    if rng.random() < 0.15 and others:
        o = others[int(rng.integers(len(others)))]
        kwargs["context"] = {"shape": o.shape, "color": o.color}
    out = Expr.from_program(kwargs)
    assert within_image_unique(out, scene, i)
    return out


def _random_thing(rng: np.random.Generator, with_color: bool = True) -> Thing:
    color = COLORS[int(rng.integers(len(COLORS)))] if with_color else None
    return Thing(SHAPES[int(rng.integers(len(SHAPES)))], color)


def random_discovery_expr(rng: np.random.Generator) -> Expr:
    """A random category-level query, e.g. "a yellow circle above a blue square"."""
    thing = _random_thing(rng)
    kind = int(rng.integers(6))
    size = SIZES[int(rng.integers(len(SIZES)))]
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    head: dict[str, Any] = {"shape": thing.shape, "color": thing.color}
    if kind == 0:
        return Expr(**head, size=size)
    if kind == 1:
        return Expr(**head, relation=Relation(rel, _random_thing(rng, rng.random() < 0.8)))
    if kind == 2:
        return Expr(**head, background=bg)
    if kind == 3:
        return Expr(shape=thing.shape, size=size, background=bg)
    if kind == 4:
        return Expr(**head, context=_random_thing(rng))
    return Expr(color=thing.color, size=size)


def discovery_expr(gallery: Gallery, rng: np.random.Generator, want_empty: bool, tries: int = 200) -> tuple[Expr, list[tuple[int, int]]] | None:
    """A query with no MAYBE instance and either zero or at least two YES matches."""
    for _ in range(tries):
        expr = random_discovery_expr(rng)
        truths = gallery.truths(expr)
        if any(t == MAYBE for _, _, t in truths):
            continue
        if (len(truths) == 0) == want_empty and (want_empty or len(truths) >= 2):
            return expr, [(s, i) for s, i, _ in truths]
    return None
