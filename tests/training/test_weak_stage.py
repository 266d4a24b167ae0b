"""``--stage weak`` through Ray Train + DeepSpeed, and what reaches the workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from reir.data.formats import ImageSample, load_samples
from reir.model.processing import NO_REFERENT
from reir.training.config import TrainConfig
from reir.training.trainer import row_to_sample, sample_to_row, without_referents


def test_weak_rows_carry_expressions_without_their_box() -> None:
    s = ImageSample(image_id="syn1", path="/x/syn1.jpg", width=64, height=64,
                    boxes=[[1.0, 2.0, 30.0, 40.0], [5.0, 6.0, 7.0, 8.0]], labels=[3, 1],
                    refs=[("the red square", 0), ("the small circle", 1)])  # fmt: skip
    weak = row_to_sample(without_referents(sample_to_row(s)))
    assert weak.refs == [("the red square", NO_REFERENT), ("the small circle", NO_REFERENT)]
    assert weak.boxes == s.boxes and weak.labels == s.labels  # unlinked boxes stay for detection


def test_loss_overrides_are_checked_against_loss_spec() -> None:
    with pytest.raises(ValidationError, match="weak_text_treshold"):
        TrainConfig(data_root="d", stage="weak", loss_overrides={"weak_text_treshold": 0.9})
    assert TrainConfig(data_root="d", stage="weak", loss_overrides={"weak_detection": False}).stage == "weak"


def test_weak_stage_trains_on_ray_and_deepspeed(ray_session: None, tmp_path: Path) -> None:
    from reir.data.synth import generate
    from reir.model import create_model
    from reir.training.trainer import run_training

    data = tmp_path / "data"
    generate(data, num_images=12, test_fraction=0.25, image_size=64, seed=5, discovery_queries=0)
    cfg = TrainConfig(data_root=str(data), output_dir=str(tmp_path / "runs"), model="tiny", stage="weak",
                      run_name="weak", max_steps=2, batch_size=4, warmup_steps=1, log_every=1,
                      loss_overrides={"weak_text_threshold": 0.995})  # fmt: skip
    model_dir = run_training(cfg)
    args = json.loads((model_dir / "training_args.json").read_text())
    stats = args["stats"]
    assert args["config"]["stage"] == "weak" and stats["steps"] == 2
    assert stats["loss_weak"] > 0 and stats["loss_obj"] > 0  # detection kept by default
    assert stats["loss_rec"] == 0 and stats["loss_clia"] == 0  # nothing tied to a referent box
    model, processor = create_model(str(model_dir))
    assert model.config.loss_spec.weak_text_threshold == 0.995  # the run's loss settings travel along
    assert model.config.vision_spec.appearance_head and stats["loss_app"] > 0  # added for stage weak
    assert processor.image_size == 64

    # The re-ranker from the same pairs, on the frozen weak model: every expression is kept
    # (no referent to detect), the loss is over images, and the checkpoint ships it.
    reranked = run_training(cfg.model_copy(update={"model": str(model_dir), "stage": "weak-rerank",
                                                   "run_name": "weak-rr", "rerank_negatives": 2}))
    args = json.loads((reranked / "training_args.json").read_text())
    stats = args["stats"]
    train_refs = sum(len(s.refs) for s in load_samples(data, "train"))
    assert args["config"]["stage"] == "weak-rerank" and stats["steps"] == 2
    assert stats["loss_rerank_ce"] > 0 and 0.0 <= stats["rerank_acc"] <= 1.0
    assert stats["rerank_texts"] == train_refs
    calibration = json.loads((reranked / "calibration.json").read_text())
    assert 0.0 < calibration["discover_threshold"] < 1.0 and calibration["num_texts"] > 0
    assert create_model(str(reranked))[0].reranker is not None
