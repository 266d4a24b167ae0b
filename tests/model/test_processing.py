from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from reir.model import InstanceOutput, ReirModel, ReirProcessor, swap_left_right, swap_top_bottom

from .synthetic import make_dataset


def test_images_normalization(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    pv = proc.images([Image.new("RGB", (200, 100), (255, 0, 127))])
    assert pv.shape == (1, 3, 64, 64) and pv.dtype == torch.float32
    assert torch.allclose(pv[0, :, 10, 10], torch.tensor([1.0, -1.0, 127 / 255 * 2 - 1]), atol=1e-5)


def test_text_padding(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    enc = proc.text(["the red square", "the big blue circle left of the yellow triangle"])
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["attention_mask"][0].sum() == 5  # [CLS] the red square [SEP]
    assert proc.tokenizer.unk_token_id not in enc["input_ids"][1].tolist()
    assert proc.text([])["input_ids"].shape[0] == 0


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_text_equals_the_tokenizers_own_call(tiny: tuple[ReirModel, ReirProcessor], padding: str) -> None:
    """ReirProcessor.text gives the tokenizer's own ids and masks after spelling correction,
    cut at its ``max_length`` and padded as configured."""
    _, proc = tiny
    proc = ReirProcessor(proc.tokenizer, image_size=proc.image_size, max_length=12, padding=padding)
    texts = ["the red square", "", "Where is the BIG blue circle, left of the yellow triangle?!",
             ("the leftmost purple one of the three small green squares below the big orange circle on the grey "
              "background in the image with a pink star"), "zzyzx qwerty café naïve", "the  second   one\t\n"]
    enc = proc.text(texts)
    ref = proc.tokenizer([proc._speller(t) for t in texts], padding=padding, truncation=True, max_length=12,
                         return_tensors="pt")  # fmt: skip
    assert enc["input_ids"].tolist() == ref["input_ids"].tolist()
    assert enc["attention_mask"].tolist() == ref["attention_mask"].tolist()
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == torch.long
    assert enc["input_ids"].shape[1] == 12  # the long text was cut (and, with max_length, all are padded to it)
    single = proc.text(["the red square"])
    assert single["input_ids"].tolist() == proc.tokenizer(["the red square"], padding=padding, truncation=True,
                                                          max_length=12)["input_ids"]  # fmt: skip


def test_postprocess_maps_to_original_pixels(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.51, 0.5, 0.2, 0.4], [0.1, 0.2, 0.1, 0.2]]])
    out = InstanceOutput(
        boxes=boxes,
        objectness_logits=torch.tensor([[2.0, 1.0, 0.0]]),
        embeddings=torch.nn.functional.normalize(torch.randn(1, 3, 8), dim=-1),
    )
    (insts,) = proc.postprocess(out, sizes=[(200, 100)], top_k=10, nms_iou=0.7)
    assert [i.rank for i in insts] == [0, 1]  # the near-duplicate is suppressed
    np.testing.assert_allclose(insts[0].box_xywh, [80.0, 30.0, 40.0, 40.0], atol=1e-4)
    np.testing.assert_allclose(insts[1].box_xywh, [10.0, 10.0, 20.0, 20.0], atol=1e-4)
    assert insts[0].score == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    assert insts[0].embedding.dtype == np.float32 and insts[0].embedding.shape == (8,)
    np.testing.assert_allclose(insts[1].embedding, out.embeddings[0, 2].numpy())
    assert len(proc.postprocess(out, sizes=[(200, 100)], top_k=1)[0]) == 1


def test_postprocess_real_model(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    model, proc = tiny
    with torch.no_grad():
        out = model.encode_images(proc.images([Image.new("RGB", (200, 100))] * 2))
    res = proc.postprocess(out, sizes=[(200, 100), (30, 60)], top_k=7, min_score=0.0)
    assert [len(r) for r in res] == [7, 7]
    scores = [i.score for i in res[0]]
    assert scores == sorted(scores, reverse=True)
    for inst in res[1]:
        x, y, w, h = inst.box_xywh
        assert 0 <= x and 0 <= y and x + w <= 30 + 1e-4 and y + h <= 60 + 1e-4


def _scored(logits: list[float]) -> InstanceOutput:
    """One image of apart boxes (no NMS between them) with these objectness logits."""
    n = len(logits)
    centres = torch.linspace(0.05, 0.95, n)
    boxes = torch.stack([centres, torch.full((n,), 0.5), torch.full((n,), 0.04), torch.full((n,), 0.04)], -1)
    return InstanceOutput(boxes=boxes[None], objectness_logits=torch.tensor([logits]),
                          embeddings=torch.nn.functional.normalize(torch.randn(1, n, 8), dim=-1))  # fmt: skip


def test_postprocess_policy_cap_floor_and_first_kept(tiny: tuple[ReirModel, ReirProcessor], tmp_path: Any) -> None:
    """At most top_k instances; past the first min_keep only those with objectness >= min_score;
    the policy is the processor's unless a call sets it, and it survives save / load."""
    _, proc = tiny
    probs = [0.9, 0.8, 0.6, 0.3, 0.12, 0.09, 0.05, 0.02, 0.01, 0.005]
    out = _scored([float(torch.logit(torch.tensor(p))) for p in probs])
    policy = ReirProcessor(proc.tokenizer, image_size=proc.image_size, instance_top_k=8, instance_min_score=0.1,
                           instance_min_keep=2)  # fmt: skip
    kept = lambda **kw: [round(i.score, 3) for i in policy.postprocess(out, sizes=[(100, 100)], **kw)[0]]
    assert kept() == [0.9, 0.8, 0.6, 0.3, 0.12]  # the floor, not the cap, ends it
    assert kept(min_score=0.0) == [0.9, 0.8, 0.6, 0.3, 0.12, 0.09, 0.05, 0.02]  # the cap
    assert kept(min_score=0.7) == [0.9, 0.8]  # the first min_keep stay whatever their score
    assert kept(min_score=0.95, min_keep=1) == [0.9]
    assert kept(top_k=3) == [0.9, 0.8, 0.6]
    policy.save_pretrained(tmp_path)
    loaded = ReirProcessor.from_pretrained(tmp_path)
    assert (loaded.instance_top_k, loaded.instance_min_score, loaded.instance_min_keep) == (8, 0.1, 2)
    assert [round(i.score, 3) for i in loaded.postprocess(out, sizes=[(100, 100)])[0]] == kept()


def test_a_checkpoint_without_a_policy_keeps_its_top_10(tiny: tuple[ReirModel, ReirProcessor], tmp_path: Any) -> None:
    """A processor saved before the policy existed loads as it stored then: top 10, no floor;
    a new one gets the default (16, floor 0.1 past the first)."""
    import json

    _, proc = tiny
    fresh = ReirProcessor(proc.tokenizer, image_size=proc.image_size)
    assert (fresh.instance_top_k, fresh.instance_min_score, fresh.instance_min_keep) == (16, 0.1, 1)
    fresh.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for key in ("instance_top_k", "instance_min_score", "instance_min_keep"):
        del cfg[key]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    old = ReirProcessor.from_pretrained(tmp_path)
    assert (old.instance_top_k, old.instance_min_score, old.instance_min_keep) == (10, 0.0, 1)
    out = _scored([-5.0] * 12)  # every objectness 0.007
    assert len(old.postprocess(out, sizes=[(100, 100)])[0]) == 10
    assert len(fresh.postprocess(out, sizes=[(100, 100)])[0]) == 1
    with pytest.raises(ValueError, match="instance policy"):
        ReirProcessor(proc.tokenizer, image_size=64, instance_min_score=1.0)


def _scenes_with_ref(text: str) -> tuple[list[Any], list[Image.Image]]:
    """Three generated scenes; ``text`` is the last expression of the first, about its box 0."""
    data = make_dataset(3, 3)
    samples, images = [s for _, s in data], [im for im, _ in data]
    samples[0].refs.append((text, 0))
    return samples, images


def test_collate_and_hflip(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    samples, images = _scenes_with_ref("the shape left of the rightmost one")
    batch = proc.collate(samples, images)
    n_refs = sum(len(s.refs) for s in samples)
    assert batch.pixel_values.shape == (3, 3, 64, 64)
    assert batch.input_ids.shape[0] == n_refs == batch.text_image_index.numel() == batch.text_target_index.numel()
    s0 = samples[0]
    x, y, w, h = s0.boxes[0]
    expect = [(x + w / 2) / s0.width, (y + h / 2) / s0.height, w / s0.width, h / s0.height]
    torch.testing.assert_close(batch.targets[0]["boxes"][0], torch.tensor(expect))
    flipped = proc.collate(samples, images, hflip_prob=1.0, rng=random.Random(0))
    fb = flipped.targets[0]["boxes"]
    torch.testing.assert_close(fb[:, 0], 1 - batch.targets[0]["boxes"][:, 0])
    torch.testing.assert_close(fb[:, 1:], batch.targets[0]["boxes"][:, 1:])
    assert flipped.texts[len(s0.refs) - 1] == "the shape right of the leftmost one"
    torch.testing.assert_close(flipped.pixel_values, batch.pixel_values.flip(-1), atol=0.05, rtol=0)
    assert batch.to("cpu").input_ids is not None


def test_vflip_mirrors_boxes_pixels_and_vertical_words(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    samples, images = _scenes_with_ref("the circle above the lowest one, left of the star")
    batch = proc.collate(samples, images)
    flipped = proc.collate(samples, images, vflip_prob=1.0, rng=random.Random(0))
    fb, b = flipped.targets[0]["boxes"], batch.targets[0]["boxes"]
    torch.testing.assert_close(fb[:, 1], 1 - b[:, 1])
    torch.testing.assert_close(fb[:, [0, 2, 3]], b[:, [0, 2, 3]])
    assert flipped.texts[len(samples[0].refs) - 1] == "the circle below the highest one, left of the star"
    torch.testing.assert_close(flipped.pixel_values, batch.pixel_values.flip(-2), atol=0.05, rtol=0)
    both = proc.collate(samples, images, hflip_prob=1.0, vflip_prob=1.0, rng=random.Random(0))
    torch.testing.assert_close(both.targets[0]["boxes"][:, :2], 1 - b[:, :2])
    assert both.texts[len(samples[0].refs) - 1] == "the circle below the highest one, right of the star"


def test_swap_top_bottom() -> None:
    assert swap_top_bottom("Above the topmost, under the upper one") == "Below the bottommost, over the lower one"
    assert swap_top_bottom("the highest square over a stopover") == "the lowest square under a stopover"
    assert swap_top_bottom("left of the largest") == "left of the largest"


def test_swap_left_right() -> None:
    assert swap_left_right("Left of the leftmost, right") == "Right of the rightmost, left"
    assert swap_left_right("the brightest") == "the brightest"
