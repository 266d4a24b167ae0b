"""Meaning of referring expressions: the single definition of every predicate.

Both the generator (to build expressions and compute ground truth) and the tests
(to re-check it) call :func:`evaluate`. Predicates are three-valued: ``YES`` when an
instance clearly satisfies it, ``NO`` when it clearly does not, ``MAYBE`` in the
margin between (e.g. an object only slightly left of another). Ground truth lists
the ``YES`` instances; an expression is used only when no instance is ``MAYBE``, so
a human reader can never reasonably pick an instance missing from ``matches``.

Geometry uses the tight box ``[x, y, w, h]`` (pixels): centre for positions, box
area for size comparisons, so everything can be recomputed from the json files.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from reir.data.vocab import BACKGROUNDS, COLORS, COMPARATIVES, ORDINALS, RELATIONS, SHAPES, SIZES, SUPERLATIVES

NO, MAYBE, YES = 0, 1, 2

# Margins as fractions of the image side. A relation is YES only with a clear offset
# along a dominant axis, NO when the offset is negligible or mostly along the other axis.
REL_YES_OFFSET = 0.10
REL_NO_OFFSET = 0.04
SUP_YES_OFFSET = 0.08
SUP_NO_OFFSET = 0.02
# Superlative of size: YES if >= 1.3x the area of every other candidate.
SIZE_YES_RATIO = 1.3
SIZE_NO_RATIO = 1.1


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # x, y, w, h pixels
    ann_id: int = -1

    @property
    def cx(self) -> float:
        return self.box[0] + self.box[2] / 2

    @property
    def cy(self) -> float:
        return self.box[1] + self.box[3] / 2

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


@dataclass
class Scene:
    image_id: str
    width: int
    height: int
    background: str
    objects: list[Obj] = field(default_factory=list)


@dataclass(frozen=True)
class Thing:
    """A plain noun phrase ("a yellow star", "the square") used as reference/context."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class Relation:
    relation: str  # one of RELATIONS
    ref: Thing


@dataclass(frozen=True)
class Expr:
    """A conjunction of predicates about one instance; rendered by reir.data.language."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    superlative: str | None = None
    relation: Relation | None = None
    background: str | None = None
    context: Thing | None = None

    def __post_init__(self) -> None:
        problems = _expr_problems(self)
        if problems:
            raise ValueError(f"invalid expression {self!r}: {'; '.join(problems)}")

    def to_program(self) -> dict[str, Any]:
        """JSON-friendly form stored next to each sentence (``sentences[].program``)."""
        out: dict[str, Any] = {}
        for key in ("shape", "color", "size", "superlative", "background"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.relation is not None:
            out["relation"] = {"relation": self.relation.relation, "ref": _thing_dict(self.relation.ref)}
        if self.context is not None:
            out["context"] = _thing_dict(self.context)
        return out

    @classmethod
    def from_program(cls, program: dict[str, Any]) -> Expr:
        rel = program.get("relation")
        ctx = program.get("context")
        return cls(
            shape=program.get("shape"),
            color=program.get("color"),
            size=program.get("size"),
            superlative=program.get("superlative"),
            relation=Relation(rel["relation"], Thing(**rel["ref"])) if rel else None,
            background=program.get("background"),
            context=Thing(**ctx) if ctx else None,
        )


def _thing_dict(thing: Thing) -> dict[str, Any]:
    return {"shape": thing.shape, **({"color": thing.color} if thing.color else {})}


def _expr_problems(e: Expr) -> list[str]:
    checks = [
        (e.shape is None and e.color is None, "needs a shape or a color"),
        (e.shape not in (None, *SHAPES), f"unknown shape {e.shape!r}"),
        (e.color not in (None, *COLORS), f"unknown color {e.color!r}"),
        (e.size not in (None, *SIZES), f"unknown size {e.size!r}"),
        (e.superlative not in (None, *SUPERLATIVES), f"unknown superlative {e.superlative!r}"),
        (e.background not in (None, *BACKGROUNDS), f"unknown background {e.background!r}"),
        # "the largest small circle" reads badly; positional ones keep their size word
        (_order(e.superlative) in ("largest", "smallest") and e.size is not None, "size superlative with size"),
        # "the leftmost circle above the square" has ambiguous scope: forbid the mix
        (e.superlative is not None and e.relation is not None, "superlative with relation"),
        (e.relation is not None and e.relation.relation not in RELATIONS, "unknown relation"),
    ]
    for thing in (e.relation.ref if e.relation else None, e.context):
        if thing is not None:
            checks.append((thing.shape not in SHAPES, f"unknown shape {thing.shape!r}"))
            checks.append((thing.color not in (None, *COLORS), f"unknown color {thing.color!r}"))
    return [msg for bad, msg in checks if bad]


# ---------------------------------------------------------------- predicates


def head_matches(obj: Obj, shape: str | None, color: str | None, size: str | None = None) -> bool:
    """Crisp attribute test (attributes are discrete, so never MAYBE)."""
    return (
        (shape is None or obj.shape == shape)
        and (color is None or obj.color == color)
        and (size is None or obj.size == size)
    )


def relation_truth(a: Obj, b: Obj, relation: str, width: float, height: float) -> int:
    """Is ``a`` <relation> ``b``? e.g. "left": a's centre clearly left of b's."""
    dx, dy = (b.cx - a.cx) / width, (b.cy - a.cy) / height
    main, other = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
        relation
    ]
    if main > REL_YES_OFFSET and main > abs(other):
        return YES
    if main < REL_NO_OFFSET or main < 0.5 * abs(other):
        return NO
    return MAYBE


def related_truth(scene: Scene, i: int, rel: Relation) -> int:
    """Existential: some *other* object fitting ``rel.ref`` stands in the relation."""
    best = NO
    a = scene.objects[i]
    for j, b in enumerate(scene.objects):
        if j != i and head_matches(b, rel.ref.shape, rel.ref.color):
            best = max(best, relation_truth(a, b, rel.relation, scene.width, scene.height))
            if best == YES:
                break
    return best


def _extremeness(obj: Obj, kind: str, width: float, height: float) -> float:
    """Bigger is more extreme for ``kind`` (positions as fractions of the side)."""
    return {
        "leftmost": -obj.cx / width,
        "rightmost": obj.cx / width,
        "topmost": -obj.cy / height,
        "bottommost": obj.cy / height,
        "largest": obj.area,
        "smallest": -obj.area,
    }[kind]


def _order(kind: str | None) -> str | None:
    """The superlative whose order an ordinal counts in, or a comparative compares in
    ("second_leftmost", "pair_leftmost" -> "leftmost")."""
    if kind in ORDINALS:
        return ORDINALS[kind][0]
    return COMPARATIVES.get(kind or "", kind)


def _clearly_ahead(a: float, b: float, kind: str) -> bool:
    """Is extremeness ``a`` clearly beyond ``b`` (size: by an area ratio, positions: by an offset)?"""
    if kind in ("largest", "smallest"):
        a, b = abs(a), abs(b)
        return (a / b if kind == "largest" else b / a) >= SIZE_YES_RATIO
    return a - b > SUP_YES_OFFSET


def ordinal_truth(scene: Scene, i: int, expr: Expr) -> int:
    """"The second circle from the left": exactly one object of the head is clearly further
    in the order, every other clearly less far. Any object too close to call either way
    makes the rank uncertain (MAYBE), unless two are already clearly ahead (NO)."""
    kind, rank = ORDINALS[expr.superlative or ""]
    w, h = scene.width, scene.height
    own = _extremeness(scene.objects[i], kind, w, h)
    ahead = unclear = 0
    for j, o in enumerate(scene.objects):
        if j == i or not head_matches(o, expr.shape, expr.color, expr.size):
            continue
        e = _extremeness(o, kind, w, h)
        if _clearly_ahead(e, own, kind):
            ahead += 1
        elif not _clearly_ahead(own, e, kind):
            unclear += 1
    if ahead >= rank:
        return NO
    if ahead == rank - 1 and not unclear:
        return YES
    return NO if ahead + unclear < rank - 1 else MAYBE


def superlative_truth(scene: Scene, i: int, expr: Expr) -> int:
    """Superlative among the image's objects sharing the expression's head attributes."""
    kind = expr.superlative
    assert kind is not None
    if kind in ORDINALS:
        return ordinal_truth(scene, i, expr)
    pair = kind in COMPARATIVES
    kind = COMPARATIVES.get(kind, kind)
    others = [
        o
        for j, o in enumerate(scene.objects)
        if j != i and head_matches(o, expr.shape, expr.color, expr.size)
    ]
    if pair and len(others) != 1:
        return NO  # "the bigger of the two circles" is false unless there are two
    if not others:
        return MAYBE  # trivially extreme, but "the largest X" implies several X: avoid it
    w, h = scene.width, scene.height
    own = _extremeness(scene.objects[i], kind, w, h)
    rival = max(_extremeness(o, kind, w, h) for o in others)
    if kind in ("largest", "smallest"):
        ratio = abs(own / rival) if kind == "largest" else abs(rival / own)
        if ratio >= SIZE_YES_RATIO:
            return YES
        return NO if ratio < 1 / SIZE_NO_RATIO else MAYBE
    if own - rival > SUP_YES_OFFSET:
        return YES
    return NO if rival - own > SUP_NO_OFFSET else MAYBE


def context_truth(scene: Scene, i: int, thing: Thing) -> int:
    """"in the image with a yellow star": another object of the image fits ``thing``."""
    found = any(
        j != i and head_matches(o, thing.shape, thing.color) for j, o in enumerate(scene.objects)
    )
    return YES if found else NO


def detail_truth(expr: Expr, scene: Scene, i: int) -> int:
    """Truth of every conjunct except the head attributes (a superlative still uses
    the head to choose the objects it compares with)."""
    if expr.background is not None and scene.background != expr.background:
        return NO
    truth = YES
    if expr.context is not None:
        truth = min(truth, context_truth(scene, i, expr.context))
    if truth and expr.relation is not None:
        truth = min(truth, related_truth(scene, i, expr.relation))
    if truth and expr.superlative is not None:
        truth = min(truth, superlative_truth(scene, i, expr))
    return truth


def evaluate(expr: Expr, scene: Scene, i: int) -> int:
    """Truth of ``expr`` for object ``i`` of ``scene``: the minimum over its conjuncts."""
    if not head_matches(scene.objects[i], expr.shape, expr.color, expr.size):
        return NO
    return detail_truth(expr, scene, i)


# ---------------------------------------------------------------- galleries


class Gallery:
    """Scenes of one split, indexed by (color, shape) so a query only visits candidates."""

    def __init__(self, scenes: list[Scene]) -> None:
        self.scenes = scenes
        self._index: dict[tuple[str | None, str | None], list[tuple[int, int]]] = defaultdict(list)
        for s, scene in enumerate(scenes):
            for i, obj in enumerate(scene.objects):
                for key in ((obj.color, obj.shape), (None, obj.shape), (obj.color, None)):
                    self._index[key].append((s, i))

    def candidates(self, expr: Expr) -> list[tuple[int, int]]:
        """Every instance whose crisp head attributes fit (all others are NO)."""
        return self._index.get((expr.color, expr.shape), [])

    def truths(self, expr: Expr) -> list[tuple[int, int, int]]:
        """(scene index, object index, truth) of every instance that is not NO."""
        out = []
        for s, i in self.candidates(expr):
            t = evaluate(expr, self.scenes[s], i)
            if t != NO:
                out.append((s, i, t))
        return out


def is_unique_referent(truths: list[tuple[int, int, int]], s: int, i: int) -> bool:
    """Exactly one non-NO instance, and it is (s, i) with a clear YES."""
    return len(truths) == 1 and truths[0] == (s, i, YES)


def within_image_unique(expr: Expr, scene: Scene, i: int) -> bool:
    """REC uniqueness: ``i`` is YES and every other object of the image is NO."""
    if evaluate(expr, scene, i) != YES:
        return False
    return all(evaluate(expr, scene, j) == NO for j in range(len(scene.objects)) if j != i)
