"""Zoom geometry (exact), the zoom loop with an injected localizer, and the model localizer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from reir.model import ReirModel, ReirProcessor
from reir.model.boxes import iou_xywh
from reir.model.localize import (
    Box,
    InstanceLocalizer,
    Localization,
    ZoomSpec,
    area_fraction,
    from_window,
    is_small,
    to_window,
    zoom_refine,
    zoom_window,
)

RED = (255, 0, 0)


def test_zoom_window_is_centred_with_the_image_aspect_ratio() -> None:
    # box 10x5 in 200x100: larger relative side 0.05, x3 -> a 30x15 window around (95, 47.5)
    assert zoom_window((90, 45, 10, 5), (200, 100), 3.0) == (80, 40, 110, 55)
    x0, y0, x1, y1 = zoom_window((50, 20, 4, 9), (200, 100), 4.0)  # tall box: height decides
    assert (x1 - x0, y1 - y0) == (72, 36) and (x1 - x0) * 100 == (y1 - y0) * 200


def test_zoom_window_is_shifted_inside_the_image_not_shrunk() -> None:
    assert zoom_window((0, 0, 10, 5), (200, 100), 3.0) == (0, 0, 30, 15)
    # 18x9 window around (197.5, 98.5) would leave the image: shifted to its corner
    assert zoom_window((195, 97, 5, 3), (200, 100), 3.0) == (182, 91, 200, 100)


def test_zoom_window_never_exceeds_the_image_and_has_at_least_a_pixel() -> None:
    assert zoom_window((10, 10, 100, 50), (200, 100), 3.0) == (0, 0, 200, 100)
    assert zoom_window((5, 5, 0.01, 0.01), (200, 100), 3.0) == (5, 5, 6, 6)


def test_boxes_map_into_and_back_out_of_a_window_exactly() -> None:
    window = (80, 40, 110, 55)
    assert to_window((92.5, 41.25, 3.5, 2.0), window) == (12.5, 1.25, 3.5, 2.0)
    assert from_window((12.5, 1.25, 3.5, 2.0), window) == (92.5, 41.25, 3.5, 2.0)
    rng = np.random.default_rng(0)
    for box in rng.uniform(0, 100, size=(20, 4)):
        assert from_window(to_window(box, window), window) == pytest.approx(tuple(box), abs=1e-12)


def test_area_fraction_and_smallness() -> None:
    assert area_fraction((0, 0, 20, 10), (200, 100)) == 0.01
    assert is_small((0, 0, 20, 10), (200, 100), 0.02) and not is_small((0, 0, 20, 10), (200, 100), 0.01)
    assert not is_small((3, 3, 0, 10), (200, 100), 0.5)  # an empty box has nothing to zoom on
    with pytest.raises(ValueError, match="image size"):
        area_fraction((0, 0, 1, 1), (0, 10))


@pytest.mark.parametrize(("field", "value"), [("small_area_fraction", 0.0), ("zoom_factor", 1.0), ("steps", 0),
                                              ("converge_iou", 1.5)])  # fmt: skip
def test_zoom_spec_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ZoomSpec(**{field: value})


class RedFinder:
    """A real localizer for a toy world: the bounding box of the red pixels of each crop."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[int, int]], list[Box | None]]] = []

    def __call__(self, crops: Sequence[Image.Image], text: str, priors: Sequence[Box | None] | None) -> list[Localization | None]:
        self.calls.append(([c.size for c in crops], list(priors or [])))
        out: list[Localization | None] = []
        for crop in crops:
            red = np.all(np.asarray(crop.convert("RGB")) == RED, axis=-1)
            ys, xs = np.nonzero(red)
            if len(xs) == 0:
                out.append(None)
                continue
            x0, y0 = int(xs.min()), int(ys.min())
            out.append(Localization((float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)), 0.9))
        return out


def _scene(objects: dict[tuple[int, int, int, int], tuple[int, int, int]]) -> Image.Image:
    img = Image.new("RGB", (200, 100), (30, 30, 30))
    for (x, y, w, h), colour in objects.items():
        img.paste(colour, (x, y, x + w, y + h))
    return img


def test_zoom_converges_on_the_object_and_maps_back_exactly() -> None:
    image = _scene({(120, 30, 6, 4): RED})
    finder = RedFinder()
    (result,) = zoom_refine(finder, [image], [(117, 28, 10, 8)], "the red one", ZoomSpec(zoom_factor=3.0, steps=5))
    assert result.box == (120.0, 30.0, 6.0, 4.0) and result.refined and result.score == 0.9
    # step 1 finds the object; step 2 finds the same box again: converged, no third crop
    assert result.steps == 2 and result.trail == ((117.0, 28.0, 10.0, 8.0), result.box, result.box)
    (sizes1, priors1), (sizes2, priors2) = finder.calls
    # 10x8 box: its height (8% of 100) decides, x3 -> a 48x24 window at (98, 20); then 24x12 at (111, 26)
    assert sizes1 == [(48, 24)] and priors1 == [(19.0, 8.0, 10.0, 8.0)]
    assert sizes2 == [(24, 12)] and priors2 == [(9.0, 4.0, 6.0, 4.0)]


def test_large_boxes_and_empty_crops_keep_their_box() -> None:
    image = _scene({(120, 30, 6, 4): RED})
    finder = RedFinder()
    large, empty = zoom_refine(finder, [image, image], [(0, 0, 100, 60), (10, 70, 8, 6)], "x", ZoomSpec())
    assert large.box == (0.0, 0.0, 100.0, 60.0) and large.steps == 0 and not large.refined and large.score is None
    assert empty.box == (10.0, 70.0, 8.0, 6.0) and empty.steps == 0 and not empty.refined
    assert [sizes for sizes, _ in finder.calls] == [[(36, 18)]]  # one crop: the small box only


def test_zoom_stops_when_the_box_is_no_longer_small() -> None:
    image = _scene({(120, 30, 6, 4): RED})
    grow = lambda crops, text, priors: [Localization((0.0, 0.0, float(c.width), float(c.height)), 0.5) for c in crops]
    (result,) = zoom_refine(grow, [image], [(117, 28, 10, 8)], "x", ZoomSpec(small_area_fraction=0.02, steps=5))
    # the whole 48x24 window (5.8% of the image) comes back: no longer small after one step
    assert result.steps == 1 and result.box == (98.0, 20.0, 48.0, 24.0)


def test_zoom_stops_after_the_step_budget_and_checks_the_localizer() -> None:
    image = _scene({})
    drift = lambda crops, text, priors: [Localization((0.0, 0.0, 2.0, 2.0), 0.5) for _ in crops]  # moves every step
    (result,) = zoom_refine(drift, [image], [(100, 50, 10, 5)], "x", ZoomSpec(steps=3))
    assert result.steps == 3 and len(result.trail) == 4
    with pytest.raises(ValueError, match="2 answers for 1 crops"):
        zoom_refine(lambda c, t, p: [None, None], [image], [(100, 50, 10, 5)], "x", ZoomSpec())
    with pytest.raises(ValueError, match="1 images but 2 boxes"):
        zoom_refine(drift, [image], [(0, 0, 1, 1), (0, 0, 1, 1)], "x", ZoomSpec())


def test_instance_localizer_picks_the_best_scoring_instance(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, processor = tiny
    images = [_scene({(120, 30, 16, 12): RED}), _scene({(10, 10, 30, 30): (0, 0, 255)}).resize((64, 48))]
    localize = InstanceLocalizer(model, processor, top_k=5)
    found = localize(images, "the red square", None)
    with torch.inference_mode():
        out = model.encode_images(processor.images(images))
        insts = processor.postprocess(out, sizes=[im.size for im in images], top_k=5)
        text = model.encode_text(**processor.text(["the red square"])).embeddings
        all_logits = [model.score(text, torch.from_numpy(np.stack([c.embedding for c in cand]))).reshape(-1)
                      for cand in insts]
    for image, loc, cand, logits in zip(images, found, insts, all_logits, strict=True):
        assert loc is not None and 0.0 < loc.score < 1.0
        best = cand[int(logits.argmax())]
        assert loc.box_xywh == tuple(best.box_xywh)
        assert loc.score == pytest.approx(float(torch.sigmoid(logits.max())), rel=1e-5)
        x, y, w, h = loc.box_xywh
        assert 0 <= x and 0 <= y and x + w <= image.width + 1e-3 and y + h <= image.height + 1e-3
    assert localize([], "x", None) == []


def test_instance_localizer_prior_and_reranker(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, processor = tiny
    image = _scene({(120, 30, 16, 12): RED})
    plain = InstanceLocalizer(model, processor, top_k=5)(
        [image], "the red square", None)[0]  # fmt: skip
    assert plain is not None
    # only instances overlapping the prior may be chosen; none overlaps a far-away 1-px prior
    strict = InstanceLocalizer(model, processor, top_k=5, min_prior_iou=0.5)
    assert strict([image], "the red square", [(0.0, 0.0, 1.0, 1.0)]) == [None]
    assert strict([image], "the red square", [plain.box_xywh]) == [plain]
    # a re-ranker whose relation weight is ~0 keeps the dual encoder's logits: the same answer
    model.add_reranker().set_scale(1e-9)
    reranked = InstanceLocalizer(model, processor, top_k=5)([image], "the red square", None)[0]
    assert reranked is not None and reranked.box_xywh == plain.box_xywh
    assert reranked.score == pytest.approx(plain.score, rel=1e-4)
    assert iou_xywh(reranked.box_xywh, plain.box_xywh) == 1.0
    # and the localizer scores with it: a weight of 3 moves the score
    assert model.reranker is not None
    model.reranker.set_scale(3.0)
    moved = InstanceLocalizer(model, processor, top_k=5)([image], "the red square", None)[0]
    assert moved is not None and moved.score != pytest.approx(plain.score, rel=1e-3)
