"""Random scenes of colored shapes and their rendering with PIL.

A scene follows a *regime* (``reir.data.layouts``): how many objects, where they go
and how alike they are. Objects are placed one after another; a placement is rejected
when it would hide more than ``MAX_COVERED`` of an earlier object or touch an object
of the same color (two touching red shapes would read as one blob). No regime needs an
exception: rows keep a gap between neighbours and look-alikes simply keep apart.

Boxes are the tight bounds of the rendered mask inside the canvas, so they agree with
the pixels exactly. A border-regime shape may extend past the image: its box is the
in-canvas part (so box centres and areas, which the semantics use, stay inside the
image), and the cut-off pixels count as hidden in ``visible``, under the same cap as
occlusion; a cut never shortens the box's long side below ``KEPT_LONG_SIDE`` of the
whole shape's, so a cut large shape still looks large.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from reir.data.layouts import CLASSIC_SIZES, Regime, get_regime, make_layout, plan_rows
from reir.data.semantics import Obj, Scene
from reir.data.vocab import BACKGROUNDS, COLORS, SHAPES

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 25),
    "purple": (140, 45, 185),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
# Sides as fractions of the image side in the classic regime (others: reir.data.layouts);
# the gap keeps "small" and "large" unmistakable.
SIZE_RANGES: dict[str, tuple[float, float]] = dict(CLASSIC_SIZES)
MAX_COVERED = 0.25  # at most this fraction of an object's pixels may be hidden (or cut off)
KEPT_LONG_SIDE = 0.85
PLACEMENT_TRIES = 40
KIND_TRIES = 20  # colour draws per planned (row) position before giving the slot up
def _star(x0: float, y0: float, s: float) -> list[tuple[float, float]]:
    cx, cy, r_out, r_in = x0 + s / 2, y0 + s / 2, s / 2, s / 2 * 0.45
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r_out, r_in)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, s: float, fill: int | tuple[int, int, int]) -> None:
    """Draw ``shape`` inscribed in the square ``(x0, y0, s, s)``."""
    x1, y1, cx, cy = x0 + s - 1, y0 + s - 1, x0 + (s - 1) / 2, y0 + (s - 1) / 2
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "hexagon":
        q = (s - 1) / 4
        draw.polygon([(x0 + q, y0), (x1 - q, y0), (x1, cy), (x1 - q, y1), (x0 + q, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(x0, y0, s), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Neutral-gray textures so every object color keeps a strong contrast."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if name == "plain":
        gray = np.full((size, size), rng.uniform(115, 140), np.float32)
    elif name == "noisy":
        gray = 128 + rng.normal(0, 16, (size, size)).astype(np.float32)
    elif name == "striped":
        period = rng.integers(8, 15)
        coord = [xx, yy, xx + yy][int(rng.integers(3))]
        gray = np.where((coord // (period / 2)) % 2 == 0, 100.0, 155.0)
    elif name == "gradient":
        t = (yy if rng.random() < 0.5 else xx) / max(size - 1, 1)
        t = 1 - t if rng.random() < 0.5 else t
        gray = 80 + 95 * t
    elif name == "checkered":
        cell = int(rng.integers(10, 17))
        gray = np.where(((xx // cell) + (yy // cell)) % 2 == 0, 105.0, 150.0)
    else:
        raise ValueError(f"unknown background {name!r}")
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _mask(shape: str, x0: int, y0: int, s: int, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, x0, y0, s, 255)
    return np.asarray(canvas) > 0


def _whole_shape(shape: str, s: int) -> tuple[int, float]:
    """(pixel count, long side of the tight box) of the uncut shape, drawn on its own."""
    mask = _mask(shape, 0, 0, s, s)
    box = _tight_box(mask)
    return int(mask.sum()), max(box[2], box[3])


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)


def _boxes_touch(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return not (
        a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
        or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1]
    )


class _Placer:
    """Keeps visible masks of the placed objects to enforce the occlusion cap."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.objects: list[Obj] = []
        self.full: list[int] = []  # pixel count of each object's whole shape, cut-off part included
        self.inside: list[int] = []  # the part of it inside the canvas (COCO "area")
        self.visible: list[np.ndarray] = []
        self.params: list[tuple[str, str, int, int, int]] = []  # what to draw, in order

    def _whole_pixels(self, shape: str, x0: int, y0: int, side: int, mask: np.ndarray) -> int | None:
        """Pixel count of the whole shape, or None when a border cut hides too much of it
        (more than the occlusion cap, or enough to shorten its box's long side)."""
        inside = int(mask.sum())
        if min(x0, y0) >= 0 and max(x0, y0) + side <= self.size:
            return inside
        full, long_side = _whole_shape(shape, side)
        full = max(full, inside)  # rasterization may differ by a pixel or two once shifted
        if inside < (1 - MAX_COVERED) * full or max(_tight_box(mask)[2:]) < KEPT_LONG_SIDE * long_side:
            return None
        return full

    def try_add(self, shape: str, color: str, size_word: str, x0: int, y0: int, side: int) -> bool:
        mask = _mask(shape, x0, y0, side, self.size)
        full = self._whole_pixels(shape, x0, y0, side, mask)
        if full is None:
            return False
        box = _tight_box(mask)
        for obj, whole, vis in zip(self.objects, self.full, self.visible):
            if obj.color == color and _boxes_touch(obj.box, box, 2.0):
                return False
            if (vis & ~mask).sum() < (1 - MAX_COVERED) * whole:
                return False
        self.visible = [vis & ~mask for vis in self.visible] + [mask]
        self.full.append(full)
        self.inside.append(int(mask.sum()))
        self.objects.append(Obj(shape, color, size_word, box))
        self.params.append((shape, color, x0, y0, side))
        return True

    def visible_fractions(self) -> list[float]:
        return [float(v.sum()) / f for v, f in zip(self.visible, self.full)]


def _palette(regime: Regime, rng: np.random.Generator) -> list[tuple[str, str]]:
    """2-3 (shape, colour) pairs for look-alikes: the second shares the first's shape,
    the third its colour, so look-alikes differ by one attribute or by none."""
    if regime.lookalike <= 0:
        return []  # no draws: regimes without look-alikes keep their old random stream
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    c1, c2 = (COLORS[int(c)] for c in rng.choice(len(COLORS), 2, replace=False))
    pairs = [(shape, c1), (shape, c2)]
    if rng.random() < 0.5:
        pairs.append((SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(len(SHAPES) - 1))) % len(SHAPES)], c1))
    return pairs


def _kind(palette: list[tuple[str, str]], regime: Regime, rng: np.random.Generator) -> tuple[str, str]:
    """(shape, colour) of the next object: from the palette at the look-alike rate."""
    if palette and rng.random() < regime.lookalike:
        return palette[int(rng.integers(len(palette)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return shape, COLORS[int(rng.integers(len(COLORS)))]


def _place_proposed(regime: Regime, size: int, target: int, rng: np.random.Generator) -> _Placer:
    """Scatter, cluster and border regimes: random proposals until ``target`` fit."""
    placer = _Placer(size)
    layout = make_layout(regime, size, rng)
    palette = _palette(regime, rng)
    n_large = 0
    for attempt in range(target * PLACEMENT_TRIES):
        if len(placer.objects) >= target:
            break
        # After many failures fall back to small shapes so every scene reaches its count.
        want_large = rng.random() < regime.p_large and n_large < regime.max_large and attempt < target * 10
        size_word = "large" if want_large else "small"
        shape, color = _kind(palette, regime, rng)
        lo, hi = regime.sizes[size_word]
        side = max(4, round(rng.uniform(lo, hi) * size))
        x0, y0 = layout.propose(side, rng, relaxed=attempt >= target * 20)
        if placer.try_add(shape, color, size_word, x0, y0, side):
            n_large += size_word == "large"
            layout.accepted()
    return placer


def _place_rows(regime: Regime, size: int, target: int, rng: np.random.Generator) -> _Placer:
    """Row regime: planned positions; only the colours are redrawn if a rule objects."""
    placer = _Placer(size)
    palette = _palette(regime, rng)
    for size_word, side, x0, y0 in plan_rows(regime, size, target, rng):
        for _ in range(KIND_TRIES):
            shape, color = _kind(palette, regime, rng)
            if placer.try_add(shape, color, size_word, x0, y0, side):
                break
    return placer


@dataclass
class Rendered:
    scene: Scene
    image: Image.Image | None  # None once written to disk (reir.data.synth's rendering processes)
    visible: list[float]  # fraction of each object's pixels left visible (not occluded, not cut off)
    pixels: list[int]  # pixel count of each object's shape inside the image (COCO "area")
    regime: str = "classic"


def sample_scene(image_id: str, size: int, rng: np.random.Generator, regime: str | Regime = "classic") -> Rendered:
    """A random scene of ``regime`` and its ``size`` x ``size`` RGB image."""
    recipe = get_regime(regime)
    target = int(rng.integers(recipe.counts[0], recipe.counts[1] + 1))
    place = _place_rows if recipe.layout == "row" else _place_proposed
    placer = place(recipe, size, target, rng)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.fromarray(draw_background(background, size, rng), "RGB")
    draw = ImageDraw.Draw(image)
    for shape, color, x0, y0, side in placer.params:
        draw_shape(draw, shape, x0, y0, side, RGB[color])
    scene = Scene(image_id=image_id, width=size, height=size, background=background, objects=placer.objects)
    return Rendered(scene, image, placer.visible_fractions(), list(placer.inside), recipe.name)
