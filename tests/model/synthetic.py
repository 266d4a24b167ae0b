"""Tiny in-test synthetic REIR scenes: colored shapes on a plain background (PIL only)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")


@dataclass
class SynthSample:
    image_id: str
    path: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    refs: list[tuple[str, int]] = field(default_factory=list)
    attrs: list[tuple[str, str]] = field(default_factory=list)


def _overlaps(box: list[float], others: list[list[float]], gap: float) -> bool:
    x, y, w, h = box
    return any(
        x < ox + ow + gap and ox < x + w + gap and y < oy + oh + gap and oy < y + h + gap
        for ox, oy, ow, oh in others
    )


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: list[float], color: tuple[int, int, int]) -> None:
    x, y, w, h = box
    if shape == "square":
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=color)
    elif shape == "circle":
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=color)
    else:
        draw.polygon([(x + w / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=color)


def _place(rng: random.Random, width: int, height: int, n: int, size_range: tuple[float, float]) -> list[list[float]]:
    boxes: list[list[float]] = []
    for _ in range(200 * n):
        if len(boxes) == n:
            break
        side = rng.uniform(*size_range) * min(width, height)
        box = [rng.uniform(0, width - side), rng.uniform(0, height - side), side, side]
        box = [float(round(v)) for v in box]
        if not _overlaps(box, boxes, gap=2.0):
            boxes.append(box)
    return boxes


def make_scene(
    rng: random.Random,
    index: int,
    *,
    width: int = 96,
    height: int = 80,
    objects: tuple[int, int] = (2, 4),
    size_range: tuple[float, float] = (0.18, 0.32),
) -> tuple[Image.Image, SynthSample]:
    """One image with 2-4 shapes, each a unique (color, shape); one expression per shape."""
    n = rng.randint(*objects)
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    boxes = _place(rng, width, height, n, size_range)
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    sample = SynthSample(image_id=f"syn{index:06d}", path="", width=width, height=height)
    for (color, shape), box in zip(combos, boxes):
        _draw(draw, shape, box, COLORS[color])
        sample.refs.append((f"the {color} {shape}", len(sample.boxes)))
        sample.boxes.append(box)
        sample.labels.append(SHAPES.index(shape))
        sample.attrs.append((color, shape))
    return image, sample


def _descriptions(i: int, sample: SynthSample) -> list[str]:
    """Expressions that single out object ``i`` (attributes, size, position, relation)."""
    color, shape = sample.attrs[i]
    boxes = sample.boxes
    cx = [b[0] + b[2] / 2 for b in boxes]
    twins = [j for j, a in enumerate(sample.attrs) if a == (color, shape)]
    if len(twins) == 1:
        out = [f"the {color} {shape}"]
        others = [j for j in range(len(boxes)) if j != i and sample.attrs.count(sample.attrs[j]) == 1]
        for j in others:  # relation to a uniquely described anchor
            side = "left" if cx[i] < cx[j] else "right"
            out.append(f"the {color} {shape} {side} of the {sample.attrs[j][0]} {sample.attrs[j][1]}")
        return out
    out = []
    sides = sorted(twins, key=lambda j: cx[j])
    if i == sides[0]:
        out.append(f"the leftmost {color} {shape}")
    if i == sides[-1]:
        out.append(f"the rightmost {color} {shape}")
    areas = sorted(twins, key=lambda j: boxes[j][2])
    if boxes[areas[0]][2] * 1.4 < boxes[areas[1]][2] and i == areas[0]:
        out.append(f"the small {color} {shape}")
    if boxes[areas[-1]][2] > 1.4 * boxes[areas[-2]][2] and i == areas[-1]:
        out.append(f"the large {color} {shape}")
    if len(twins) == 2:  # a relation to a unique anchor that sits between the twins
        other = twins[0] if twins[1] == i else twins[1]
        for j, attrs in enumerate(sample.attrs):
            if sample.attrs.count(attrs) == 1 and min(cx[i], cx[other]) < cx[j] < max(cx[i], cx[other]):
                side = "left" if cx[i] < cx[j] else "right"
                out.append(f"the {color} {shape} {side} of the {attrs[0]} {attrs[1]}")
    return out


def make_relational_scene(
    rng: random.Random,
    index: int,
    *,
    width: int = 160,
    height: int = 128,
    size_range: tuple[float, float] = (0.12, 0.3),
) -> tuple[Image.Image, SynthSample]:
    """3-5 shapes where one (color, shape) appears twice: only position, size or a relation
    to another object disambiguates the twins. One expression per describable object."""
    n = rng.randint(3, 5)
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], n - 1)
    combos.append(combos[0])
    boxes = _place(rng, width, height, n, size_range)
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    sample = SynthSample(image_id=f"rel{index:06d}", path="", width=width, height=height)
    for (color, shape), box in zip(combos, boxes):
        _draw(draw, shape, box, COLORS[color])
        sample.boxes.append(box)
        sample.labels.append(SHAPES.index(shape))
        sample.attrs.append((color, shape))
    for i in range(len(sample.boxes)):
        options = _descriptions(i, sample)
        if options:
            sample.refs.append((rng.choice(options), i))
    return image, sample


def make_dataset(
    seed: int, count: int, start: int = 0, *, relational: bool = False, **kwargs: object
) -> list[tuple[Image.Image, SynthSample]]:
    rng = random.Random(seed)
    make = make_relational_scene if relational else make_scene
    return [make(rng, start + i, **kwargs) for i in range(count)]  # type: ignore[arg-type]
