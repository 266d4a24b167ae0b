from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from reir.data.formats import ImageSample
from reir.training.config import TrainConfig, deepspeed_config, head_deepspeed_config
from reir.training.precision import cpu_autocast_enabled, cpu_multiplies_bf16, training_autocast
from reir.training.trainer import lr_factor, row_to_sample, sample_to_row


def test_deepspeed_config_follows_typed_config() -> None:
    cfg = TrainConfig(data_root="d", batch_size=8, grad_accum=4, zero_stage=0, grad_clip=0.5)
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 0}
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # CPU runs: DeepSpeed's bf16 mode stays off (autocast instead)
    assert deepspeed_config(cfg.model_copy(update={"use_gpu": True}))["bf16"]["enabled"] is True


def test_head_stages_train_in_fp32_without_zero_partitioning() -> None:
    cfg = TrainConfig(data_root="d", stage="rerank", batch_size=128, zero_stage=2, use_gpu=True, grad_clip=0.5)
    ds = head_deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 0} and ds["bf16"]["enabled"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 128 and ds["gradient_clipping"] == 0.5
    assert deepspeed_config(cfg)["zero_optimization"] == {"stage": 2}  # the big model's stages keep theirs


def test_unknown_or_bad_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        TrainConfig(data_root="d", learning_rate=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TrainConfig(data_root="d", stage="3")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TrainConfig(data_root="d", zero_stage=4)
    assert TrainConfig(data_root="d", zero_stage=3).zero_stage == 3  # full weights are gathered to save
    with pytest.raises(ValidationError, match="stage rerank"):
        TrainConfig(data_root="d", stage="rerank", resume=True)
    with pytest.raises(ValidationError, match="rerank_calibration_every 1"):
        TrainConfig(data_root="d", stage="rerank", rerank_calibration_every=1)
    with pytest.raises(ValidationError):
        TrainConfig(data_root="d", stage="rerank", rerank_calibration_every=-2)


def test_weak_stage_from_a_preset_gets_the_appearance_head(tmp_path) -> None:  # type: ignore[no-untyped-def]
    weak = TrainConfig(data_root="d", stage="weak", model="tiny")
    assert weak.applied_model_overrides == {"vision__appearance_head": True} and weak.model_overrides == {}
    # a preset that names the head keeps its own choice (small has it, with the embedding probes)
    assert TrainConfig(data_root="d", stage="weak", model="small").applied_model_overrides == {}
    kept = {"vision": {"appearance_head": False}, "embed_dim": 64}
    assert TrainConfig(data_root="d", stage="weak", model="tiny", model_overrides=kept).applied_model_overrides == kept
    assert TrainConfig(data_root="d", stage="weak", model="tiny", model_overrides={"vision__appearance_head": False}
                       ).applied_model_overrides == {"vision__appearance_head": False}  # fmt: skip
    assert TrainConfig(data_root="d", stage="1", model="tiny").applied_model_overrides == {}
    (tmp_path / "model").mkdir()  # a checkpoint directory keeps its own architecture
    assert weak.model_copy(update={"model": str(tmp_path / "model")}).applied_model_overrides == {}
    assert weak.model_copy(update={"stage": "weak-rerank"}).applied_model_overrides == {}


def test_lr_warms_up_then_decays() -> None:
    assert lr_factor(0.0, 0, 10) == pytest.approx(0.1)
    assert lr_factor(0.0, 9, 10) == pytest.approx(1.0)
    mid, end = lr_factor(0.5, 100, 10), lr_factor(1.0, 200, 10)
    assert 1.0 > mid > end == pytest.approx(0.05)


def test_rows_round_trip_samples() -> None:
    s = ImageSample(image_id="syn1", path="/x/syn1.jpg", width=128, height=96,
                    boxes=[[1.0, 2.0, 30.0, 40.0], [5.5, 6.0, 7.0, 8.0]], labels=[3, 1],
                    refs=[("the red square", 0), ("the small circle", 1)], scene=3)
    assert row_to_sample(sample_to_row(s)) == s


def test_score_temperature_and_bias_get_their_own_faster_group() -> None:
    from reir.model import create_model
    from reir.training.trainer import SCORE_PARAMS, _param_groups

    model, _ = create_model("tiny")
    groups = _param_groups(model, TrainConfig(data_root="d", score_lr_mult=7.0, weight_decay=0.1))
    by_mult = {g["lr_mult"]: g for g in groups}
    score_ids = {id(getattr(model, n)) for n in SCORE_PARAMS}
    assert {id(p) for p in by_mult[7.0]["params"]} == score_ids
    assert by_mult[7.0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    decayed = [g for g in groups if g["weight_decay"] == 0.1]
    assert decayed and all(p.ndim > 1 for p in decayed[0]["params"])


def test_relative_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from reir.training.trainer import with_absolute_paths

    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(TrainConfig(data_root="data", model="ckpt", output_dir="runs"))
    assert cfg.model == str(tmp_path / "ckpt")
    assert cfg.data_root == str(tmp_path / "data") and cfg.output_dir == str(tmp_path / "runs")
    assert with_absolute_paths(TrainConfig(data_root="d", model="small")).model == "small"  # presets stay names


def test_text_encoder_learns_at_its_own_rate() -> None:
    from reir.model import create_model
    from reir.training.trainer import TEXT_PREFIX, _param_groups

    model, _ = create_model("tiny")
    groups = _param_groups(model, TrainConfig(data_root="d", text_lr_mult=0.1, score_lr_mult=7.0))
    text_ids = {id(p) for n, p in model.named_parameters() if n.startswith(TEXT_PREFIX)}
    slow = [p for g in groups if g["lr_mult"] == 0.1 for p in g["params"]]
    assert text_ids and {id(p) for p in slow} == text_ids
    assert {g["weight_decay"] for g in groups if g["lr_mult"] == 0.1} == {0.0, 0.05}  # norms/biases still skip decay
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_cpu_autocast_modes() -> None:
    assert cpu_autocast_enabled("on", "cpu") and not cpu_autocast_enabled("off", "cpu")
    assert cpu_autocast_enabled("auto", "cpu") == cpu_multiplies_bf16()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # torch's probe agrees with the flags the kernel reports
        flags = set(cpuinfo.read_text().split())
        assert cpu_multiplies_bf16() == bool(flags & {"amx_tile", "avx512_bf16"})
    assert not cpu_autocast_enabled("on", "cuda")  # GPU training keeps DeepSpeed's own bf16 mode
    with training_autocast(True):
        assert torch.is_autocast_enabled("cpu")
    with training_autocast(False):
        assert not torch.is_autocast_enabled("cpu")


def test_train_images_keeps_the_first_by_image_id(tmp_path: Path) -> None:
    from reir.data.formats import load_samples, negative_groups
    from reir.data.synth import generate
    from reir.training.trainer import first_train_images

    generate(tmp_path, num_images=80, test_fraction=0.25, image_size=64, seed=4, discovery_queries=0,
             train_discovery_queries=0)  # 60 train images in chunks of 50 (MIN_TRAIN_CHUNK)
    samples = load_samples(tmp_path, "train")
    ids = sorted(s.image_id for s in samples)
    first = first_train_images(list(reversed(samples)), 55)
    assert [s.image_id for s in first] == ids[:55]
    assert first_train_images(samples, None) is samples
    # the kept images' negative groups are the full split's: whole chunks stay whole
    full = dict(zip([s.image_id for s in samples], negative_groups(tmp_path, "train", [s.image_id for s in samples])))
    kept_groups = negative_groups(tmp_path, "train", [s.image_id for s in first])
    assert kept_groups == [full[s.image_id] for s in first] and sorted(set(kept_groups)) == [0, 1]
    with pytest.raises(ValueError, match="holds 60 images"):
        first_train_images(samples, 61)


def test_train_images_is_for_data_roots_train_split() -> None:
    assert TrainConfig(data_root="d", train_images=5).train_images == 5
    with pytest.raises(ValidationError, match="train_images"):
        TrainConfig(data_root="d", train_images=5, sources=[{"kind": "synthetic", "path": "d"}])
    with pytest.raises(ValidationError):
        TrainConfig(data_root="d", train_images=0)


def test_extra_train_roots_join_with_ids_and_groups_of_their_own(tmp_path: Path) -> None:
    from reir.data.formats import load_samples, negative_groups
    from reir.data.synth import generate
    from reir.training.trainer import extra_train_samples

    for name, seed in (("a", 1), ("b", 2)):  # 24 and 30 train images, one of each a test image
        generate(tmp_path / name, num_images=25 if name == "a" else 31, test_fraction=0.0, image_size=64, seed=seed,
                 discovery_queries=0, train_discovery_queries=0, train_chunk=10)
    a, b = (load_samples(tmp_path / n, "train") for n in ("a", "b"))
    more, groups = extra_train_samples([str(tmp_path / "a"), str(tmp_path / "b")], 7)
    assert [s.path for s in more] == [s.path for s in a + b]
    # the same image key in two benchmarks names two images: the prefix keeps them apart
    assert [s.image_id for s in more] == [f"extra0/{s.image_id}" for s in a] + [f"extra1/{s.image_id}" for s in b]
    assert len({s.image_id for s in more}) == len(more)
    own_a = negative_groups(tmp_path / "a", "train", [s.image_id for s in a])
    own_b = negative_groups(tmp_path / "b", "train", [s.image_id for s in b])
    assert groups[: len(a)] == [7 + g for g in own_a]  # numbered after data_root's groups
    assert groups[len(a):] == [max(groups[: len(a)]) + 1 + g for g in own_b]  # and after each other's
    with pytest.raises(FileNotFoundError, match="reircoco.json"):
        extra_train_samples([str(tmp_path / "missing")], 0)


def test_extra_train_roots_are_for_data_roots_train_split() -> None:
    assert TrainConfig(data_root="d", extra_train_roots=["e"]).extra_train_roots == ["e"]
    with pytest.raises(ValidationError, match="extra_train_roots"):
        TrainConfig(data_root="d", extra_train_roots=["e"], sources=[{"kind": "synthetic", "path": "d"}])
