"""Box conventions and geometry: the one place where box formats are converted.

Storage and the wire use absolute pixels ``[x, y, w, h]`` (COCO, ``BoxMode.XYWH_ABS``).
The model works in normalized ``[cx, cy, w, h]`` (``BoxMode.CXCYWH_NORM``) relative to
the original image size. Functions accept numpy arrays or torch tensors of shape
``(..., 4)`` and return the same type.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class BoxMode(str, Enum):
    XYWH_ABS = "xywh_abs"  # COCO: top-left corner + size, pixels
    XYXY_ABS = "xyxy_abs"  # corners, pixels
    CXCYWH_NORM = "cxcywh_norm"  # center + size, fractions of image width/height
    XYXY_NORM = "xyxy_norm"  # corners, fractions of image width/height


def _stack(parts: list[Any], like: ArrayT) -> ArrayT:
    if isinstance(like, torch.Tensor):
        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def _to_xyxy_abs(b: ArrayT, mode: BoxMode, width: Any, height: Any) -> ArrayT:
    x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    if mode is BoxMode.XYXY_ABS:
        return b
    if mode is BoxMode.XYWH_ABS:
        return _stack([x0, y0, x0 + b[..., 2], y0 + b[..., 3]], b)
    if mode is BoxMode.XYXY_NORM:
        return _stack([x0 * width, y0 * height, x1 * width, y1 * height], b)
    if mode is BoxMode.CXCYWH_NORM:
        cx, cy, w, h = x0 * width, y0 * height, b[..., 2] * width, b[..., 3] * height
        return _stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], b)
    raise ValueError(f"unknown box mode {mode!r}")


def _from_xyxy_abs(b: ArrayT, mode: BoxMode, width: Any, height: Any) -> ArrayT:
    x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    if mode is BoxMode.XYXY_ABS:
        return b
    if mode is BoxMode.XYWH_ABS:
        return _stack([x0, y0, x1 - x0, y1 - y0], b)
    if mode is BoxMode.XYXY_NORM:
        return _stack([x0 / width, y0 / height, x1 / width, y1 / height], b)
    if mode is BoxMode.CXCYWH_NORM:
        return _stack(
            [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], b
        )
    raise ValueError(f"unknown box mode {mode!r}")


def convert(
    boxes: ArrayT, src: BoxMode, dst: BoxMode, *, width: float | np.ndarray = 1.0, height: float | np.ndarray = 1.0
) -> ArrayT:
    """Convert ``boxes`` (..., 4) from ``src`` to ``dst``; width/height are the image's pixels
    (or arrays of shape ``boxes.shape[:-1]``: each box with its own image's size)."""
    src, dst = BoxMode(src), BoxMode(dst)
    if src is dst:
        return boxes
    if isinstance(boxes, np.ndarray):
        boxes = boxes.astype(np.float64, copy=False)
    return _from_xyxy_abs(_to_xyxy_abs(boxes, src, width, height), dst, width, height)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area_xyxy(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def pairwise_iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union between every box of ``a`` (N,4) and ``b`` (M,4), xyxy: (N,M) each."""
    area_a, area_b = box_area_xyxy(a), box_area_xyxy(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) between every pair, xyxy: (N,M)."""
    iou, union = pairwise_iou_xyxy(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def iou_xywh(a: Any, b: Any) -> float:
    """IoU of two single boxes in absolute ``[x, y, w, h]`` (the wire format)."""
    ax0, ay0, aw, ah = (float(v) for v in a)
    bx0, by0, bw, bh = (float(v) for v in b)
    ix = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    iy = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = ix * iy
    union = max(aw, 0.0) * max(ah, 0.0) + max(bw, 0.0) * max(bh, 0.0) - inter
    return inter / union if union > 0 else 0.0


def nms_xyxy(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, *, max_keep: int | None = None
) -> torch.Tensor:
    """Greedy non-maximum suppression over xyxy ``boxes`` (N,4) with ``scores`` (N,).

    Returns the kept positions (long, N' <= max_keep) in decreasing score order. A box is
    dropped when its IoU with an already kept, higher-scoring box exceeds ``iou_threshold``.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True)
    iou = pairwise_iou_xyxy(boxes[order], boxes[order])[0].cpu().numpy()
    limit = len(order) if max_keep is None else max_keep
    suppressed = np.zeros(len(order), dtype=bool)
    kept: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) >= limit:
            break
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(kept, dtype=torch.long)]


def region_means(pixels: torch.Tensor, boxes: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Mean pixel value ``[n, C]`` of the central part of each box.

    ``pixels [C, H, W]``; ``boxes [n, 4]`` normalized cxcywh. The region keeps the box's
    centre and ``fraction`` of its width and height (at least one pixel), where the object
    itself, not the background around it, fills most of the box. An integral image makes
    each box O(1).
    """
    c, h, w = pixels.shape
    if boxes.numel() == 0:
        return pixels.new_zeros((0, c))
    integral = torch.zeros((c, h + 1, w + 1), dtype=torch.float32, device=pixels.device)
    integral[:, 1:, 1:] = pixels.float().cumsum(1).cumsum(2)
    cx, cy, bw, bh = boxes.detach().float().unbind(-1)
    half_w, half_h = bw * fraction / 2, bh * fraction / 2
    x0 = ((cx - half_w) * w).floor().long().clamp(0, w - 1)
    y0 = ((cy - half_h) * h).floor().long().clamp(0, h - 1)
    x1 = torch.maximum(((cx + half_w) * w).ceil().long().clamp(1, w), x0 + 1)
    y1 = torch.maximum(((cy + half_h) * h).ceil().long().clamp(1, h), y0 + 1)
    total = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]  # [C, n]
    return (total / ((x1 - x0) * (y1 - y0)).float()).t()
