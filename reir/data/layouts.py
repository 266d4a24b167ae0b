"""Scene regimes: how many objects a scene holds, where they go and how alike they are.

Outside test sets show busier images than the old generator made (8-9+ objects, many
look-alikes), and a model trained on sparse scenes loses much of its accuracy there.
A *regime* is a named recipe for :func:`reir.data.scene.sample_scene`; the benchmark
mixes several for training and holds some out entirely, so the test split can measure
generalization to an unseen arrangement honestly.

Size words keep one meaning in every regime (a "small" side is at most 0.14 of the
image, a "large" one at least 0.23), so a regime never changes what a word refers to;
dense regimes only draw from the low end of each band.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CLASSIC_SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.14), "large": (0.25, 0.40)}
DENSE_SIZES: dict[str, tuple[float, float]] = {"small": (0.065, 0.11), "large": (0.23, 0.30)}
MID_SIZES: dict[str, tuple[float, float]] = {"small": (0.07, 0.13), "large": (0.23, 0.32)}
# A border cut keeps the long side of a large shape above 0.2 of the image.
BORDER_SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.14), "large": (0.27, 0.40)}
LAYOUTS = ("scatter", "cluster", "row", "border")
# Fraction of a border shape's side that lies outside; at least a little, so that stars
# (whose points sit inside their square) still reach the edge.
BORDER_CUT = (0.1, 0.3)
CLUSTER_SPREAD = 0.1  # standard deviation of positions around a cluster centre (of side)
ROW_GAP = 3  # pixels between neighbours of a row: never "touching", never occluding
MAX_PER_ROW = 6
ROW_JITTER = 0.04  # a row line's random offset (of side) from its even position
RELAX_AFTER = 20  # attempts per object before a layout falls back to scattering


@dataclass(frozen=True)
class Regime:
    """A scene recipe: object count range (inclusive), layout and look-alike rate.

    ``lookalike`` is the chance that an object's (shape, colour) comes from a palette of
    2-3 pairs drawn per scene (pairs share the shape or the colour), so several objects
    of a scene differ only by size and position; ``border`` is the range of objects
    placed across the image border.
    """

    name: str
    counts: tuple[int, int]
    layout: str = "scatter"
    sizes: Mapping[str, tuple[float, float]] = field(default_factory=lambda: CLASSIC_SIZES)
    p_large: float = 0.4
    max_large: int = 3
    lookalike: float = 0.0
    border: tuple[int, int] = (0, 0)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly recipe for meta.json."""
        out = asdict(self)
        out["sizes"] = {k: list(v) for k, v in self.sizes.items()}
        out["counts"], out["border"] = list(self.counts), list(self.border)
        return out


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("classic", (3, 8)),  # the generator before regimes existed (same draws)
    Regime("sparse", (3, 6)),
    Regime("dense", (9, 13), sizes=DENSE_SIZES, p_large=0.25, max_large=2, lookalike=0.3),
    Regime("lookalike", (6, 11), sizes=MID_SIZES, p_large=0.35, max_large=3, lookalike=0.8),
    Regime("cluster", (5, 10), "cluster", MID_SIZES, p_large=0.3, max_large=2, lookalike=0.2),
    Regime("row", (4, 10), "row", DENSE_SIZES, p_large=0.25, max_large=3, lookalike=0.3),
    Regime("border", (4, 8), "border", BORDER_SIZES, p_large=0.4, max_large=3, border=(2, 4)),
)}


def get_regime(regime: str | Regime) -> Regime:
    if isinstance(regime, Regime):
        return regime
    if regime not in REGIMES:
        raise ValueError(f"unknown scene regime {regime!r}; known: {sorted(REGIMES)}")
    return REGIMES[regime]


# ---------------------------------------------------------------- regime mixtures


def split_mixture(train: Mapping[str, float], heldout: tuple[str, ...], split: str, heldout_share: float) -> dict[str, float]:
    """Regime weights of a split: train uses ``train`` alone; test gives the held-out
    regimes ``heldout_share`` of the images (evenly) and the train mixture the rest."""
    total = float(sum(train.values()))
    if split == "train" or not heldout:
        return {k: w / total for k, w in train.items() if w > 0}
    out = {k: (1 - heldout_share) * w / total for k, w in train.items() if w > 0}
    for name in heldout:
        out[name] = out.get(name, 0.0) + heldout_share / len(heldout)
    return out


def mixture_problems(train: Mapping[str, float], heldout: tuple[str, ...]) -> list[str]:
    """Why a (train mixture, held-out) pair cannot be used; empty when it can."""
    names = [*train, *heldout]
    checks = [
        (any(n not in REGIMES for n in names), f"unknown regime in {names}; known: {sorted(REGIMES)}"),
        (any(w < 0 for w in train.values()) or sum(train.values()) <= 0, "regime weights must be >= 0 with a positive sum"),
        (any(train.get(n, 0) > 0 for n in heldout), "a held-out regime has a train weight"),
    ]
    return [msg for bad, msg in checks if bad]


def pick_regime(mixture: Mapping[str, float], rng: np.random.Generator) -> str:
    """One draw; names are sorted so the choice does not depend on the dict's order."""
    names = sorted(mixture)
    cumulative = np.cumsum([mixture[n] for n in names])
    k = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return names[min(k, len(names) - 1)]


# ---------------------------------------------------------------- positions


class Layout:
    """Proposes the top-left corner of an object's square; subclasses bias where."""

    def __init__(self, size: int) -> None:
        self.size = size

    def propose(self, side: int, rng: np.random.Generator, relaxed: bool) -> tuple[int, int]:
        # Uniform over the canvas; the exact draw of the pre-regime generator.
        x0, y0 = (int(v) for v in rng.integers(0, self.size - side + 1, 2))
        return x0, y0

    def accepted(self) -> None:
        """Called when the last proposal was placed."""


class ClusterLayout(Layout):
    """Positions around 1-2 centres, so objects crowd and overlap up to the cap."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        super().__init__(size)
        n = 1 + int(rng.random() < 0.5)
        self.centres = rng.uniform(0.25 * size, 0.75 * size, (n, 2))

    def propose(self, side: int, rng: np.random.Generator, relaxed: bool) -> tuple[int, int]:
        if relaxed:
            return super().propose(side, rng, relaxed)
        centre = self.centres[int(rng.integers(len(self.centres)))]
        cx, cy = centre + rng.normal(0.0, CLUSTER_SPREAD * self.size, 2)
        hi = self.size - side
        return int(np.clip(round(cx - side / 2), 0, hi)), int(np.clip(round(cy - side / 2), 0, hi))


class BorderLayout(Layout):
    """The first few objects straddle a random image edge (cut by ``BORDER_CUT`` of
    their side); the rest scatter."""

    def __init__(self, size: int, n_border: int) -> None:
        super().__init__(size)
        self.pending = n_border
        self.last_was_border = False

    def propose(self, side: int, rng: np.random.Generator, relaxed: bool) -> tuple[int, int]:
        self.last_was_border = self.pending > 0 and not relaxed
        if not self.last_was_border:
            return super().propose(side, rng, relaxed)
        edge = int(rng.integers(4))
        along = int(rng.integers(0, self.size - side + 1))
        cut = max(1, round(rng.uniform(*BORDER_CUT) * side))
        across = [-cut, self.size - side + cut][edge % 2]
        return (across, along) if edge < 2 else (along, across)

    def accepted(self) -> None:
        self.pending -= self.last_was_border


def make_layout(regime: Regime, size: int, rng: np.random.Generator) -> Layout:
    """The position proposer of a non-row regime (scatter draws nothing here)."""
    if regime.layout == "cluster":
        return ClusterLayout(size, rng)
    if regime.layout == "border":
        return BorderLayout(size, int(rng.integers(regime.border[0], regime.border[1] + 1)))
    if regime.layout == "scatter":
        return Layout(size)
    raise ValueError(f"layout {regime.layout!r} is planned, not proposed")


# ---------------------------------------------------------------- rows


def _row_sides(regime: Regime, size: int, k: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(size word, side) of ``k`` row neighbours, shrunk until they fit with even gaps."""
    words = ["small"] * k
    n_large = 0
    for j in range(k):
        if rng.random() < regime.p_large and n_large < regime.max_large:
            words[j], n_large = "large", n_large + 1
    sides = [max(4, round(rng.uniform(*regime.sizes[w]) * size)) for w in words]
    room = size - (k + 1) * ROW_GAP
    small_side = max(4, round(regime.sizes["small"][0] * size))
    while sum(sides) > room and "large" in words:
        j = max((j for j in range(k) if words[j] == "large"), key=lambda j: sides[j])
        words[j], sides[j] = "small", small_side
    if sum(sides) > room:  # tiny canvases only: shrink the small shapes evenly
        sides = [max(4, s * room // sum(sides)) for s in sides]
    return list(zip(words, sides))


def plan_rows(regime: Regime, size: int, n: int, rng: np.random.Generator) -> list[tuple[str, int, int, int]]:
    """(size word, side, x0, y0) of ``n`` objects on 1-2 evenly spaced rows (or columns);
    square centres lie on the row line, so box centres do up to a pixel or two."""
    n_rows = 2 if n > MAX_PER_ROW else 1 + int(n >= 4 and rng.random() < 0.5)
    vertical = rng.random() < 0.5
    band = size / n_rows
    out = []
    for r in range(n_rows):
        k = n // n_rows + (r < n % n_rows)
        line = (r + 0.5) * band + rng.uniform(-ROW_JITTER, ROW_JITTER) * size
        row = _row_sides(regime, size, k, rng)
        gap = (size - sum(s for _, s in row)) / (k + 1)
        along = gap
        for word, side in row:
            across = int(np.clip(round(line - side / 2), 0, size - side))
            x0, y0 = (across, round(along)) if vertical else (round(along), across)
            out.append((word, side, int(x0), int(y0)))
            along += side + gap
    return out
