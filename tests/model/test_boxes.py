from __future__ import annotations

import numpy as np
import torch

from reir.model.boxes import (
    BoxMode,
    convert,
    cxcywh_to_xyxy,
    iou_xywh,
    nms_xyxy,
    region_means,
    xyxy_to_cxcywh,
)


def test_convert_round_trip_numpy_and_torch() -> None:
    xywh = np.array([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 200.0, 100.0]])
    for mode in BoxMode:
        there = convert(xywh, BoxMode.XYWH_ABS, mode, width=200, height=100)
        back = convert(there, mode, BoxMode.XYWH_ABS, width=200, height=100)
        np.testing.assert_allclose(back, xywh, atol=1e-9)
        t = torch.as_tensor(xywh, dtype=torch.float64)
        back_t = convert(convert(t, BoxMode.XYWH_ABS, mode, width=200, height=100), mode, BoxMode.XYWH_ABS, width=200, height=100)
        assert isinstance(back_t, torch.Tensor)
        torch.testing.assert_close(back_t, t)
    norm = convert(xywh, BoxMode.XYWH_ABS, BoxMode.CXCYWH_NORM, width=200, height=100)
    np.testing.assert_allclose(norm[0], [0.125, 0.4, 0.15, 0.4])


def test_cxcywh_xyxy_torch_round_trip() -> None:
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1]])
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b)


def test_nms_removes_duplicates() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [20, 20, 30, 30], [0, 0, 10, 9.9]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.95, 0.5, 0.1])
    keep = nms_xyxy(boxes, scores, 0.7)
    assert keep.tolist() == [1, 2]
    assert nms_xyxy(boxes, scores, 0.7, max_keep=1).tolist() == [1]
    assert nms_xyxy(boxes[:0], scores[:0], 0.7).numel() == 0


def test_iou_xywh() -> None:
    assert iou_xywh([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert abs(iou_xywh([0, 0, 10, 10], [5, 0, 10, 10]) - 1 / 3) < 1e-9


def test_region_means_reads_the_centre_of_each_box() -> None:
    pixels = torch.zeros(3, 16, 16)
    pixels[:, 4:12, 4:12] = torch.tensor([1.0, -1.0, 0.5])[:, None, None]  # an 8x8 object
    # A box 12 px wide around it (2 px of background on each side): its centre half is the object.
    boxes = torch.tensor([[0.5, 0.5, 0.75, 0.75], [0.125, 0.125, 0.25, 0.25]])
    means = region_means(pixels, boxes)
    assert torch.allclose(means[0], torch.tensor([1.0, -1.0, 0.5]))
    assert torch.allclose(means[1], torch.zeros(3))  # background corner
    whole = region_means(pixels, boxes[:1], fraction=1.0)  # 64 of 144 pixels are the object
    assert torch.allclose(whole[0], torch.tensor([1.0, -1.0, 0.5]) * 64 / 144)
    tiny_box = region_means(pixels, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))  # at least one pixel
    assert torch.allclose(tiny_box[0], torch.tensor([1.0, -1.0, 0.5]))
    assert region_means(pixels, torch.zeros(0, 4)).shape == (0, 3)
