"""Random scenes of colored shapes and their rendering with PIL.

Objects are placed one after another; a placement is rejected when it would hide
more than ``MAX_COVERED`` of an earlier object or touch an object of the same color
(two touching red shapes would read as one blob). Boxes are the tight bounds of the
rendered mask, so they agree with the pixels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
# Sides as fractions of the image side; the gap keeps "small" and "large" unmistakable.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.08, 0.14), "large": (0.25, 0.40)}
P_LARGE = 0.4
MAX_LARGE = 3  # more large shapes rarely fit under the occlusion cap
MAX_COVERED = 0.25  # at most this fraction of an object's pixels may be hidden
MIN_OBJECTS, MAX_OBJECTS = 3, 8
PLACEMENT_TRIES = 40


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
        self.full: list[int] = []  # pixel count of each object's whole shape
        self.visible: list[np.ndarray] = []
        self.params: list[tuple[str, str, int, int, int]] = []  # what to draw, in order

    def try_add(self, shape: str, color: str, size_word: str, rng: np.random.Generator) -> bool:
        lo, hi = SIZE_RANGES[size_word]
        side = max(4, round(rng.uniform(lo, hi) * self.size))
        x0, y0 = (int(v) for v in rng.integers(0, self.size - side + 1, 2))
        mask = _mask(shape, x0, y0, side, self.size)
        box = _tight_box(mask)
        for obj, full, vis in zip(self.objects, self.full, self.visible):
            if obj.color == color and _boxes_touch(obj.box, box, 2.0):
                return False
            if (vis & ~mask).sum() < (1 - MAX_COVERED) * full:
                return False
        self.visible = [vis & ~mask for vis in self.visible] + [mask]
        self.full.append(int(mask.sum()))
        self.objects.append(Obj(shape, color, size_word, box))
        self.params.append((shape, color, x0, y0, side))
        return True

    def visible_fractions(self) -> list[float]:
        return [float(v.sum()) / f for v, f in zip(self.visible, self.full)]


def _place_objects(size: int, rng: np.random.Generator) -> _Placer:
    placer = _Placer(size)
    target = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    n_large = 0
    for attempt in range(target * PLACEMENT_TRIES):
        if len(placer.objects) >= target:
            break
        # After many failures fall back to small shapes so every scene reaches 3 objects.
        want_large = rng.random() < P_LARGE and n_large < MAX_LARGE and attempt < target * 10
        size_word = "large" if want_large else "small"
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = COLORS[int(rng.integers(len(COLORS)))]
        if placer.try_add(shape, color, size_word, rng):
            n_large += size_word == "large"
    return placer


@dataclass
class Rendered:
    scene: Scene
    image: Image.Image
    visible: list[float]  # fraction of each object's pixels left visible
    pixels: list[int]  # pixel count of each object's whole shape (COCO "area")


def sample_scene(image_id: str, size: int, rng: np.random.Generator) -> Rendered:
    """A random scene and its ``size`` x ``size`` RGB image."""
    placer = _place_objects(size, rng)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.fromarray(draw_background(background, size, rng), "RGB")
    draw = ImageDraw.Draw(image)
    for shape, color, x0, y0, side in placer.params:
        draw_shape(draw, shape, x0, y0, side, RGB[color])
    scene = Scene(image_id=image_id, width=size, height=size, background=background, objects=placer.objects)
    return Rendered(scene, image, placer.visible_fractions(), list(placer.full))
