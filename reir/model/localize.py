"""Query-conditioned localization and the small-object zoom loop.

The visual branch never sees the text, so the box an expression refers to in an image is
the detected instance that scores highest with it (the relation-aware re-ranker's logit
when the model has one, else the dual encoder's). :class:`InstanceLocalizer` does that
for a batch of images or crops.

Small objects get few pixels in the model's ``S x S`` input, so their boxes are coarse.
:func:`zoom_refine` (progressive zoom, as in PIZA for small-object REC) re-runs the
localizer on an enlarged window around a box whose area is a small fraction of the
image, maps the predicted box back, and repeats a few steps: until the box stops
changing, is no longer small, or the crop holds no instance near the previous box.

Geometry: boxes are absolute pixels ``[x, y, w, h]`` (the wire format); a window is an
integer pixel rectangle ``(x0, y0, x1, y1)``, because a PIL crop is on whole pixels, so
mapping a box from a crop back to the image is an exact translation. Windows keep the
image's aspect ratio: the model resizes every input to a square without keeping the
aspect ratio, and a window shaped like the image is stretched exactly as the full images
the model was trained on.

No ray / pymilvus / prometheus_client here: the model-side half of the serving stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .boxes import iou_xywh
from .rerank import pack_instance_sets

Box = tuple[float, float, float, float]  # absolute pixels [x, y, w, h]
Window = tuple[int, int, int, int]  # integer pixels (x0, y0, x1, y1), x1/y1 exclusive


@dataclass(frozen=True)
class Localization:
    """The referred box in one image (or crop) and its probability (sigmoid of the logit)."""

    box_xywh: Box
    score: float


# (images or crops, expression, prior box per image in its own pixels or None) -> one
# Localization per image, None where it holds no (acceptable) instance.
BatchLocalizer = Callable[[Sequence[Image.Image], str, Sequence[Box | None] | None], Sequence[Localization | None]]


@dataclass(frozen=True)
class ZoomSpec:
    """When and how far to zoom.

    Attributes:
        small_area_fraction: a box is small when ``w * h / (W * H)`` is below this.
        zoom_factor: the window is this many times the box's larger relative side.
        steps: at most this many crops per box.
        converge_iou: stop once the new box overlaps the previous one this much.
    """

    small_area_fraction: float = 0.02
    zoom_factor: float = 3.0
    steps: int = 3
    converge_iou: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.small_area_fraction <= 1.0:
            raise ValueError(f"small_area_fraction must be in (0, 1], got {self.small_area_fraction}")
        if not self.zoom_factor > 1.0:
            raise ValueError(f"zoom_factor must be > 1, got {self.zoom_factor}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 < self.converge_iou <= 1.0:
            raise ValueError(f"converge_iou must be in (0, 1], got {self.converge_iou}")


@dataclass(frozen=True)
class ZoomResult:
    """Outcome of :func:`zoom_refine` for one box.

    Attributes:
        box: the final box in image pixels (the input box when nothing was refined).
        score: the localizer's probability for ``box``, None when no crop was localized.
        steps: crops localized (0 when the box was not small or not zoomable).
        refined: ``box`` differs from the input box.
        trail: the input box, then the box after each localized step.
    """

    box: Box
    score: float | None
    steps: int
    refined: bool
    trail: tuple[Box, ...]


def as_box(values: Sequence[float]) -> Box:
    x, y, w, h = (float(v) for v in values)
    return (x, y, w, h)


def area_fraction(box: Sequence[float], size: tuple[int, int]) -> float:
    """The box's area over the image's (``size`` = (width, height)); 0 for empty boxes."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return max(float(box[2]), 0.0) * max(float(box[3]), 0.0) / (float(width) * float(height))


def is_small(box: Sequence[float], size: tuple[int, int], fraction: float) -> bool:
    """A non-empty box covering less than ``fraction`` of the image."""
    return float(box[2]) > 0 and float(box[3]) > 0 and area_fraction(box, size) < fraction


def zoom_window(box: Sequence[float], size: tuple[int, int], zoom_factor: float) -> Window:
    """The integer window around ``box``, ``zoom_factor`` times its larger relative side.

    The window has the image's aspect ratio (up to rounding to whole pixels), is centred
    on the box where the image allows, is shifted (not shrunk) to stay inside the image,
    and never exceeds it.
    """
    width, height = int(size[0]), int(size[1])
    x, y, w, h = as_box(box)
    scale = min(1.0, zoom_factor * max(w / width, h / height))
    win_w = min(width, max(1, round(scale * width)))
    win_h = min(height, max(1, round(scale * height)))
    x0 = min(max(round(x + w / 2 - win_w / 2), 0), width - win_w)
    y0 = min(max(round(y + h / 2 - win_h / 2), 0), height - win_h)
    return (x0, y0, x0 + win_w, y0 + win_h)


def to_window(box: Sequence[float], window: Window) -> Box:
    """Image pixels -> the window's (crop's) pixels."""
    x, y, w, h = as_box(box)
    return (x - window[0], y - window[1], w, h)


def from_window(box: Sequence[float], window: Window) -> Box:
    """The window's (crop's) pixels -> image pixels (exact inverse of :func:`to_window`)."""
    x, y, w, h = as_box(box)
    return (x + window[0], y + window[1], w, h)


def zoom_refine(
    localizer: BatchLocalizer,
    images: Sequence[Image.Image],
    boxes: Sequence[Sequence[float]],
    text: str,
    spec: ZoomSpec,
) -> list[ZoomResult]:
    """Zoom on every small box of ``boxes`` (one per image of ``images``) for ``text``.

    Each step crops one window per still-active box and calls ``localizer`` once for all
    of them (one batched forward pass), with the previous box (in crop pixels) as prior.
    A box leaves the loop when the localizer finds nothing, when the new box overlaps
    the previous one by ``converge_iou`` or more, or when it is no longer small.
    """
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    start = [as_box(b) for b in boxes]
    current = list(start)
    trails: list[list[Box]] = [[b] for b in start]
    scores: list[float | None] = [None] * len(start)
    active = [i for i, b in enumerate(start) if is_small(b, images[i].size, spec.small_area_fraction)]
    for _ in range(spec.steps):
        if not active:
            break
        windows = [zoom_window(current[i], images[i].size, spec.zoom_factor) for i in active]
        crops = [images[i].crop(win) for i, win in zip(active, windows, strict=True)]
        priors: list[Box | None] = [to_window(current[i], win) for i, win in zip(active, windows, strict=True)]
        found = list(localizer(crops, text, priors))
        if len(found) != len(active):
            raise ValueError(f"localizer returned {len(found)} answers for {len(active)} crops")
        still: list[int] = []
        for i, win, loc in zip(active, windows, found, strict=True):
            if loc is None:
                continue
            new = from_window(loc.box_xywh, win)
            moved = iou_xywh(new, current[i]) < spec.converge_iou
            current[i], scores[i] = new, float(loc.score)
            trails[i].append(new)
            if moved and is_small(new, images[i].size, spec.small_area_fraction):
                still.append(i)
        active = still
    return [
        ZoomResult(box=current[i], score=scores[i], steps=len(trails[i]) - 1, refined=current[i] != start[i],
                   trail=tuple(trails[i]))
        for i in range(len(start))
    ]  # fmt: skip


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class InstanceLocalizer:
    """A :data:`BatchLocalizer` over a model and its processor (``reir.model`` contract).

    Runs the visual branch on the images, keeps each image's top ``top_k`` instances
    after NMS, scores them with the expression and returns the best one. With a prior
    box, only instances overlapping it by ``min_prior_iou`` or more may be chosen: the
    zoom refines the box of the candidate the ranker picked (with the whole image as
    context) instead of picking another object inside a crop that lost that context.
    """

    def __init__(
        self, model: Any, processor: Any, *, top_k: int = 10, nms_iou: float = 0.7, min_prior_iou: float = 0.0,
        use_reranker: bool = True,
    ) -> None:  # fmt: skip
        self.model = model
        self.processor = processor
        self.top_k = top_k
        self.nms_iou = nms_iou
        self.min_prior_iou = min_prior_iou
        self.use_reranker = use_reranker

    def __call__(
        self, images: Sequence[Image.Image], text: str, priors: Sequence[Box | None] | None = None
    ) -> list[Localization | None]:
        if not images:
            return []
        sizes = [(int(im.width), int(im.height)) for im in images]
        with torch.inference_mode():
            pixels = self._to_device(self.processor.images(list(images)))
            output = self.model.encode_images(pixels)
            per_image = self.processor.postprocess(output, sizes=sizes, top_k=self.top_k, nms_iou=self.nms_iou)
            logits = self._logits(text, per_image, sizes)
        priors = list(priors) if priors is not None else [None] * len(images)
        return [self._pick(insts, row, prior) for insts, row, prior in zip(per_image, logits, priors, strict=True)]

    def _pick(self, instances: Sequence[Any], logits: np.ndarray, prior: Box | None) -> Localization | None:
        allowed = [
            j for j, inst in enumerate(instances)
            if prior is None or self.min_prior_iou <= 0 or iou_xywh(inst.box_xywh, prior) >= self.min_prior_iou
        ]  # fmt: skip
        if not allowed:
            return None
        best = max(allowed, key=lambda j: float(logits[j]))
        return Localization(as_box(instances[best].box_xywh), _sigmoid(float(logits[best])))

    def _to_device(self, tensor: Any) -> Any:
        device = getattr(self.model, "device", None)
        return tensor.to(device) if isinstance(tensor, torch.Tensor) and isinstance(device, torch.device) else tensor

    def _logits(self, text: str, per_image: Sequence[Sequence[Any]], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """One logit per instance of each image for ``text`` (empty arrays for empty images)."""
        enc = self.processor.text([text])
        ids, mask = (self._to_device(enc[k]) for k in ("input_ids", "attention_mask"))
        if not any(per_image):
            return [np.zeros(0, dtype=np.float32) for _ in per_image]
        if self.use_reranker and getattr(self.model, "reranker", None) is not None:
            return self._rerank_logits(ids, mask, per_image, sizes)
        text_emb = self.model.encode_text(ids, mask).embeddings
        out = []
        for insts in per_image:
            if not insts:
                out.append(np.zeros(0, dtype=np.float32))
                continue
            emb = np.stack([np.asarray(i.embedding, dtype=np.float32) for i in insts])
            inst_emb = self._to_device(torch.from_numpy(emb)) if isinstance(text_emb, torch.Tensor) else emb
            out.append(_numpy(self.model.score(text_emb, inst_emb)).reshape(-1))
        return out

    def _rerank_logits(
        self, ids: Any, mask: Any, per_image: Sequence[Sequence[Any]], sizes: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        # The relation re-ranker reads what the index stores per instance: embedding,
        # box (cxcywh relative to the image, here the crop) and objectness.
        full = [i for i, insts in enumerate(per_image) if insts]  # a row with no instance has no softmax
        out = [np.zeros(0, dtype=np.float32) for _ in per_image]
        per_image = [per_image[i] for i in full]
        sizes = [sizes[i] for i in full]
        emb, boxes, objectness, inst_mask = pack_instance_sets(
            [[x.embedding for x in insts] for insts in per_image], [[x.box_xywh for x in insts] for insts in per_image],
            [[x.score for x in insts] for insts in per_image], sizes,
        )  # fmt: skip
        logits = _numpy(self.model.rerank_logits(
            ids, mask, *(self._to_device(torch.from_numpy(a)) for a in (emb, boxes, objectness, inst_mask))
        ))  # fmt: skip
        for row, i in enumerate(full):
            out[i] = logits[row, : len(per_image[row])]
        return out
