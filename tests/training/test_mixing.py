"""Mixed-source training data: weighted epochs, the Ray Dataset built from them, the label
space across sources, and one real Ray Train + DeepSpeed run on two mixed sources."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from reir.training.config import SourceSpec, TrainConfig
from reir.training.mixing import epoch_counts, fit_num_classes, mix_plan, mixed_dataset

SIZES, WEIGHTS = [30, 500, 120], [3.0, 1.0, 1.0]


def _source_of(plan: np.ndarray, sizes: list[int]) -> np.ndarray:
    return np.searchsorted(np.cumsum(sizes), plan, side="right")


def test_epoch_counts_follow_weights_and_add_up() -> None:
    assert epoch_counts(SIZES, WEIGHTS, 650) == [390, 130, 130]
    assert epoch_counts([5, 5, 5], [1.0, 1.0, 1.0], 10) == [4, 3, 3]  # largest remainder, ties by order
    with pytest.raises(ValueError, match="every source needs images"):
        epoch_counts([3, 0], [1.0, 1.0], 10)


def test_each_epoch_draws_sources_in_proportion_to_their_weights() -> None:
    plan = mix_plan(SIZES, WEIGHTS, epoch_size=650, epochs=4, seed=5)
    assert plan.shape == (4 * 650,)
    offsets = [0, 30, 530]
    subsets = []
    for epoch in plan.reshape(4, 650):
        source = _source_of(epoch, SIZES)
        assert Counter(source.tolist()) == {0: 390, 1: 130, 2: 130}
        # The small source repeats every image 13 times; the large ones give distinct images.
        assert set(Counter(epoch[source == 0].tolist()).values()) == {13}
        assert len(set(epoch[source == 1].tolist())) == 130
        subsets.append(set(epoch[source == 1].tolist()))
        # Shuffled across sources: any window of 100 holds them near their shares (binomial, 4 sigma).
        for window in source[:300].reshape(3, 100):
            share = float(np.mean(window == 0))
            assert abs(share - 0.6) < 4 * np.sqrt(0.6 * 0.4 / 100)
        assert epoch.min() >= 0 and all(epoch[source == k].min() >= offsets[k] for k in range(3))
    assert len(subsets[0] | subsets[1] | subsets[2] | subsets[3]) > 300  # fresh subsets every epoch


def test_the_plan_is_reproducible_by_seed() -> None:
    a = mix_plan(SIZES, WEIGHTS, epoch_size=200, epochs=2, seed=1)
    assert np.array_equal(a, mix_plan(SIZES, WEIGHTS, epoch_size=200, epochs=2, seed=1))
    assert not np.array_equal(a, mix_plan(SIZES, WEIGHTS, epoch_size=200, epochs=2, seed=2))
    assert not np.array_equal(a[:200], a[200:])


def test_mixed_dataset_rows_follow_the_plan(ray_session: None) -> None:
    rows = [{"image_id": f"img{i}", "source": i // 3} for i in range(6)]
    plan = mix_plan([3, 3], [1.0, 3.0], epoch_size=40, epochs=1, seed=0)
    got = mixed_dataset(rows, plan).take_all()
    assert Counter(r["image_id"] for r in got) == Counter(f"img{i}" for i in plan.tolist())
    assert Counter(r["source"] for r in got) == {0: 10, 1: 30}


def test_source_specs_parse_and_validate() -> None:
    assert SourceSpec.parse("coco:/data/instances.json:2.5") == SourceSpec(kind="coco", path="/data/instances.json",
                                                                            weight=2.5)
    assert SourceSpec.parse("sorec:/data/a:b.json").path == "/data/a:b.json"  # no weight: the colon is the path's
    with pytest.raises(ValidationError, match="kind"):
        SourceSpec.parse("voc:/data")
    with pytest.raises(ValidationError, match="weight"):
        SourceSpec.parse("coco:/x.json:0")
    with pytest.raises(ValueError, match="expected KIND:PATH"):
        SourceSpec.parse("coco")
    with pytest.raises(ValidationError, match="no training data"):
        TrainConfig()


def test_num_classes_covers_the_merged_label_space(tiny_checkpoint: Path) -> None:
    cfg = TrainConfig(model="tiny", data_root="d")  # tiny: 6 classes
    assert fit_num_classes(cfg, 6) == cfg
    assert fit_num_classes(cfg, 9).model_overrides == {"vision__num_classes": 9}
    ckpt = TrainConfig(model=str(tiny_checkpoint), data_root="d")
    assert fit_num_classes(ckpt, 5) == ckpt
    with pytest.raises(ValueError, match="9 categories but .* vision.num_classes=6"):
        fit_num_classes(ckpt, 9)


def _coco_detection(root: Path) -> Path:
    """Four 64-px images with one or two boxes of two categories the synthetic set lacks."""
    root.mkdir()
    images, anns = [], []
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(root / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns += [{"id": 10 * i + k, "image_id": i + 1, "category_id": 1 + k, "bbox": [4 + 20 * k, 8, 16, 20]}
                 for k in range(1 + i % 2)]
    cats = [{"id": 1, "name": "cup"}, {"id": 2, "name": "lamp"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_training_on_two_mixed_sources(ray_session: None, tmp_path: Path) -> None:
    from reir.data.synth import generate
    from reir.model import create_model
    from reir.training.trainer import run_training

    generate(tmp_path / "synth", num_images=12, test_fraction=0.25, image_size=64, seed=3, discovery_queries=2)
    sources = [SourceSpec(kind="synthetic", path=str(tmp_path / "synth"), weight=3.0),
               SourceSpec(kind="coco", path=str(_coco_detection(tmp_path / "coco")), weight=1.0)]
    cfg = TrainConfig(model="tiny", sources=sources, output_dir=str(tmp_path / "runs"), run_name="mix",
                      batch_size=4, max_steps=2, warmup_steps=1, log_every=1, epoch_size=8)
    model_dir = run_training(cfg)
    args = json.loads((model_dir / "training_args.json").read_text())
    assert args["stats"]["steps"] == 2
    shapes = [c["name"] for c in sorted(json.loads((tmp_path / "synth" / "instances_train.json").read_text())
                                        ["categories"], key=lambda c: c["id"])]
    assert args["categories"] == [*shapes, "cup", "lamp"]
    assert [(s["kind"], s["images"], s["per_epoch"]) for s in args["sources"]] == [("synthetic", 9, 6), ("coco", 4, 2)]
    model, _ = create_model(model_dir)
    assert model.config.vision_spec.num_classes == 8  # widened from tiny's 6 to the merged label space
    assert args["config"]["model_overrides"] == {"vision__num_classes": 8}


def test_a_run_keeps_the_label_space_of_its_starting_checkpoint(tmp_path: Path) -> None:
    from reir.training.mixing import start_label_space

    (tmp_path / "training_args.json").write_text(json.dumps({"categories": ["cup", "square", "lamp"]}))
    labels = start_label_space(str(tmp_path))
    assert labels.names == ["cup", "square", "lamp"] and labels.index("circle") == 3
    assert start_label_space("tiny").names == []


@pytest.mark.parametrize("stage", ["1", "2"])
def test_detection_only_samples_train_without_expressions(stage: str) -> None:
    """COCO-detection samples carry no refs: a batch of them has no text at all."""
    import torch

    from reir.data.formats import ImageSample
    from reir.model import create_model
    from reir.model.losses import ReirCriterion

    torch.manual_seed(0)
    model, processor = create_model("tiny")
    samples = [ImageSample("1", "-", 64, 64, boxes=[[4.0, 8.0, 16.0, 20.0]], labels=[1]), ImageSample("2", "-", 64, 64)]
    batch = processor.collate(samples, [Image.new("RGB", (64, 64))] * 2)
    assert batch.input_ids.shape[0] == 0
    losses = ReirCriterion(model.config, stage=stage)(model, batch)
    assert float(losses["loss_rec"]) == 0.0 and float(losses["loss_clia"]) == 0.0
    assert torch.isfinite(losses["loss"]) and float(losses["loss_giou"]) > 0
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
