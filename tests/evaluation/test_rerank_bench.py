"""bench/rerank.py: the seen-images gallery (--train-gallery) it scores beside the test split."""

from __future__ import annotations

from pathlib import Path

import pytest

from reir.data.formats import ImageSample

from .benchload import load_bench

bench = load_bench("rerank")


def _samples(n: int, refs_each: int) -> list[ImageSample]:
    return [ImageSample(f"im{i}", f"/x/{i}.png", 64, 64, boxes=[[0.0, 0.0, 8.0, 8.0]] * refs_each, labels=[0] * refs_each,
                        refs=[(f"expression {i}.{r}", r) for r in range(refs_each)]) for i in range(n)]  # fmt: skip


def test_train_chunk_keeps_group_0_and_draws_the_queries() -> None:
    samples = _samples(6, 3)
    groups = [0, 1, 0, 1, 0, 1]
    chunk = bench.train_chunk(Path("d"), samples, groups, 4, seed=0)
    assert [s.image_id for s in chunk] == ["im0", "im2", "im4"]  # every image of the gallery, refs or not
    kept = [text for s in chunk for text, _ in s.refs]
    assert len(kept) == 4 and len(set(kept)) == 4
    for s in chunk:  # each kept ref still points at its own box
        assert all(text == f"expression {s.image_id[2:]}.{j}" for text, j in s.refs)
    assert samples[0].refs and len(samples[0].refs) == 3  # the caller's samples are not modified
    assert bench.train_chunk(Path("d"), samples, groups, 100, seed=0)[0].refs == samples[0].refs  # capped at all refs
    assert kept != [t for s in bench.train_chunk(Path("d"), samples, groups, 4, seed=1) for t, _ in s.refs]


def test_train_chunk_needs_negative_groups() -> None:
    with pytest.raises(SystemExit, match="no negative groups"):
        bench.train_chunk(Path("d"), _samples(3, 1), [0, 0, 0], 2, seed=0)


def test_defaults_train_as_the_rerank_stage() -> None:
    """The bench's recipe follows stage rerank's own: its negative pool, held-out calibration
    images, carrier words and stored-instance policy (None: the checkpoint's), unless told."""
    from reir.training.config import TrainConfig

    fields = TrainConfig.model_fields
    args = bench.parse_args(["--data", "d", "--model", "m"])
    assert args.negative_pool == fields["rerank_negative_pool"].default
    assert args.calibration_every == fields["rerank_calibration_every"].default
    assert args.filler_rate == fields["filler_rate"].default
    assert args.top_k is None and args.spec == "{}"
    told = bench.parse_args(["--data", "d", "--model", "m", "--negative-pool", "0", "--top-k", "10",
                             "--spec", '{"num_relations": 12}'])  # fmt: skip
    assert (told.negative_pool, told.top_k, told.spec) == (0, 10, '{"num_relations": 12}')
    for bad in ("{num_relations: 12}", "[12]"):  # refused before any feature is built
        with pytest.raises(SystemExit, match="--spec"):
            bench.parse_args(["--data", "d", "--model", "m", "--spec", bad])


def test_extra_train_images_follow_with_groups_of_their_own(tmp_path: Path) -> None:
    from reir.data.formats import load_samples, negative_groups
    from reir.data.synth import generate

    for name, seed in (("a", 1), ("b", 2)):
        generate(tmp_path / name, num_images=24, test_fraction=0.5, image_size=64, seed=seed, discovery_queries=0,
                 train_discovery_queries=0)
    samples = load_samples(tmp_path / "a", "train")
    groups = negative_groups(tmp_path / "a", "train", [s.image_id for s in samples])
    extra = load_samples(tmp_path / "b", "train")
    extra_groups = negative_groups(tmp_path / "b", "train", [s.image_id for s in extra])
    both, both_groups = bench.with_extra_train(samples, groups, tmp_path / "b")
    assert [s.path for s in both] == [s.path for s in samples] + [s.path for s in extra]
    assert both_groups[: len(groups)] == groups
    assert both_groups[len(groups):] == [g + max(groups) + 1 for g in extra_groups]
    assert not set(both_groups[: len(groups)]) & set(both_groups[len(groups):])  # no cross-benchmark negatives
    few, few_groups = bench.with_extra_train(samples, groups, tmp_path / "b", images=3)
    assert [s.path for s in few[len(samples):]] == [s.path for s in extra[:3]] and len(few_groups) == len(samples) + 3
