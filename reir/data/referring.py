"""Choosing referring expressions for targets, for both splits and for discovery.

An expression is a head (color and/or shape) plus "details" (size, relation,
superlative, background, context), each a partial :class:`Expr`. The truth of a
conjunction is the minimum of its conjuncts, so per-candidate truths of each detail
are folded into two bitmasks (YES, not-NO) and a combination is tested with two
ANDs. Every accepted expression is re-checked with the full evaluator.
"""

from __future__ import annotations

import functools
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
    detail_truth,
    head_matches,
    is_unique_referent,
    relation_truth,
)
from reir.data.vocab import BACKGROUNDS, COLORS, COMPARATIVES, ORDINALS, RELATIONS, SHAPES, SIZES, SUPERLATIVES

MAX_TEST_WORDS = 20
MAX_DETAILS = 3
# Extra cost of an ordinal ("second from the left") or a comparative ("the bigger of the two")
# when the planner weighs details. At the cost of their words alone (one or two) they named
# about one training referent in five, crowding out the relations and backgrounds that most
# queries carry; at +3 words about one in eight.
RANK_COST = 3.0
_RANKED = frozenset([*ORDINALS, *COMPARATIVES])


@dataclass(frozen=True)
class _Detail:
    kind: str  # the Expr field it sets
    value: Any
    yes: int  # bit k set: candidate k is YES
    live: int  # bit k set: candidate k is not NO
    words: int  # words this detail adds to the sentence


class _Scope:
    """Candidates of one search (a gallery's same-head instances, or one image's
    objects) with cached truth masks of single details."""

    def __init__(self, members: list[tuple[Scene, int]]) -> None:
        self.members = members
        self._cache: dict[Any, tuple[int, int]] = {}

    def masks(self, head: dict[str, Any], kind: str, value: Any) -> tuple[int, int]:
        # Only superlatives depend on the head; other details are shared across heads.
        sup = kind == "superlative"
        key = (kind, value, head.get("shape"), head.get("color")) if sup else (kind, value)
        if key not in self._cache:
            expr = Expr(**head, **{kind: value})
            yes = live = 0
            for k, (scene, i) in enumerate(self.members):
                if sup and not head_matches(scene.objects[i], expr.shape, expr.color):
                    continue  # the head conjunct makes it NO anyway
                t = detail_truth(expr, scene, i)
                yes |= (t == YES) << k
                live |= (t != NO) << k
            self._cache[key] = (yes, live)
        return self._cache[key]


@functools.lru_cache(maxsize=4096)
def _detail_words(kind: str, value: Any) -> int:
    """Words a detail adds; independent of the head ("the red circle" -> +N)."""
    head = {"shape": "circle"}
    return len(render(Expr(**head, **{kind: value})).split()) - len(render(Expr(**head)).split())


def _unique_things(scene: Scene, i: int) -> list[tuple[int, Thing]]:
    """Noun phrases naming exactly one other object of the image ("the red square")."""
    out = []
    for j, o in enumerate(scene.objects):
        if j == i:
            continue
        for thing in (Thing(o.shape, o.color), Thing(o.shape)):
            hits = [k for k, p in enumerate(scene.objects) if head_matches(p, thing.shape, thing.color)]
            if hits == [j]:
                out.append((j, thing))
    return out


def detail_fields(scene: Scene, i: int, *, context: bool = True) -> list[tuple[str, Any]]:
    """Details that might hold for object ``i`` as (Expr field, value)."""
    obj = scene.objects[i]
    out: list[tuple[str, Any]] = [("size", obj.size), ("background", scene.background)]
    out += [("superlative", kind) for kind in SUPERLATIVES]
    for j, thing in _unique_things(scene, i):
        for rel in RELATIONS:
            if relation_truth(obj, scene.objects[j], rel, scene.width, scene.height) == YES:
                out.append(("relation", Relation(rel, thing)))
    if context:
        others = {Thing(o.shape, o.color) for k, o in enumerate(scene.objects) if k != i}
        out += [("context", t) for t in sorted(others, key=lambda t: (t.shape, t.color or ""))]
    return out


def _details(head: dict[str, Any], fields: list[tuple[str, Any]], scope: _Scope, pos: int) -> list[_Detail]:
    """Details that are YES for the target at ``pos``, with masks over the scope."""
    out = []
    for kind, value in fields:
        yes, live = scope.masks(head, kind, value)
        if yes >> pos & 1:
            out.append(_Detail(kind, value, yes, live, _detail_words(kind, value)))
    return out


def _compatible(combo: tuple[_Detail, ...]) -> bool:
    kinds = {d.kind for d in combo}
    # Positional superlatives were evaluated without the size word: keep them apart.
    clash = "superlative" in kinds and ("relation" in kinds or "size" in kinds)
    return len(kinds) == len(combo) and not clash


def _combos(details: list[_Detail], sizes: range) -> list[tuple[_Detail, ...]]:
    return [c for n in sizes for c in itertools.combinations(details, n) if _compatible(c)]


def _live(combo: tuple[_Detail, ...], start: int) -> int:
    for d in combo:
        start &= d.live
    return start


def _build(head: dict[str, Any], combo: tuple[_Detail, ...]) -> Expr:
    return Expr(**head, **{d.kind: d.value for d in combo})


class TestPlanner:
    """Finds gallery-unique expressions; caches detail masks per head across targets."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self._scopes: dict[tuple[str, str], _Scope] = {}

    def _scope(self, head: Expr) -> _Scope:
        key = (head.color or "", head.shape or "")
        if key not in self._scopes:
            members = [(self.gallery.scenes[s], i) for s, i in self.gallery.candidates(head)]
            self._scopes[key] = _Scope(members)
        return self._scopes[key]

    def expression(self, s: int, i: int, rng: np.random.Generator) -> Expr | None:
        """Shortest (random ties) expression naming (s, i) uniquely in the gallery."""
        scene = self.gallery.scenes[s]
        obj = scene.objects[i]
        head = {"shape": obj.shape, "color": obj.color}
        scope = self._scope(Expr(**head))
        pos = scope.members.index((scene, i))
        details = _details(head, detail_fields(scene, i), scope, pos)
        everyone = (1 << len(scope.members)) - 1
        # A random per-target preference among kinds mixes relations, superlatives,
        # backgrounds... instead of always the globally shortest kind.
        bias = {kind: 4.0 * rng.random() for kind in ("size", "background", "superlative", "relation", "context")}
        bias["ranked"] = RANK_COST + 4.0 * rng.random()
        scored = [
            (sum(d.words + bias["ranked" if d.value in _RANKED else d.kind] for d in c) + 1.5 * rng.random(), c)
            for c in _combos(details, range(MAX_DETAILS + 1))
            if sum(d.words for d in c) <= MAX_TEST_WORDS
        ]
        scored.sort(key=lambda x: x[0])
        for _, combo in scored:
            if _live(combo, everyone) == 1 << pos:
                expr = _build(head, combo)
                # Safety net: the bitmask shortcut must agree with the full evaluator.
                if is_unique_referent(self.gallery.truths(expr), s, i):
                    return expr
        return None


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
        ref = _random_thing(rng, rng.random() < 0.8)
        if ref.shape == thing.shape and ref.color in (None, thing.color):
            ref = Thing(SHAPES[(SHAPES.index(ref.shape) + 1) % len(SHAPES)], ref.color)
        return Expr(**head, relation=Relation(rel, ref))
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
