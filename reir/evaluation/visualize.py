"""Pictures of queries and their top answers, boxes drawn (green = ground truth)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from reir.data.formats import Query
from reir.model.boxes import iou_xywh

CELL = 192


def _cell(path: Path, box: Sequence[float], color: str, truth: Sequence[float] | None) -> Image.Image:
    with Image.open(path) as im:
        img = im.convert("RGB")
    sx, sy = CELL / img.width, CELL / img.height
    img = img.resize((CELL, CELL))
    draw = ImageDraw.Draw(img)
    for b, c in ((truth, "lime"), (box, color)):
        if b is not None:
            x, y, w, h = b
            draw.rectangle([x * sx, y * sy, (x + w) * sx, (y + h) * sy], outline=c, width=3)
    return img


def _target_in(q: Query, image_id: str, box: Sequence[float]) -> Sequence[float] | None:
    """The query's target in ``image_id`` that ``box`` overlaps most (None: the image has none)."""
    boxes = [b for i, b in q.ground_truth if i == image_id]
    return max(boxes, key=lambda b: iou_xywh(box, b)) if boxes else None


def draw_examples(out: Path, queries: Sequence[Query], answers: Sequence[list[dict[str, Any]]],
                  *, per_query: int = 3) -> Path:
    """One row per query: the ground-truth image, then its top answers (red box, score);
    answers are found by the ``uri`` the service returned."""
    header = 40
    canvas = Image.new("RGB", (CELL * (per_query + 1), (CELL + header) * len(queries)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (q, ans) in enumerate(zip(queries, answers)):
        y0 = row * (CELL + header)
        draw.text((4, y0 + 2), "\n".join(textwrap.wrap(f'"{q.text}"', 90)[:2]), fill="black")
        canvas.paste(_cell(Path(q.path), q.box, "lime", None), (0, y0 + header))
        draw.text((4, y0 + header + 2), "truth", fill="lime")
        for col, a in enumerate(ans[:per_query], start=1):
            truth = _target_in(q, a["image_id"], a["box"])
            canvas.paste(_cell(Path(a["uri"].removeprefix("file://")), a["box"], "red", truth),
                         (col * CELL, y0 + header))
            draw.text((col * CELL + 4, y0 + header + 2), f"#{col} {a['score']:.2f}", fill="red")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
