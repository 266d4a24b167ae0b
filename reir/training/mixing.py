"""Mixed-source training data: ``TrainConfig.sources`` -> one weighted Ray Dataset.

Every epoch draws ``epoch_size`` images, each source contributing in proportion to its
weight: a source with fewer images than its share repeats them (each ``floor`` or
``ceil`` of share/size times), a larger one gives a fresh random subset every epoch.
The draw is a plan of row indices fixed by the seed; the Dataset materializes rows from
it block by block on Ray Data workers, so the driver holds the parsed annotations once
and an index array, never the epochs' rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reir.data.formats import ImageSample, LabelSpace, load_source, negative_groups
from reir.training.config import SourceSpec, TrainConfig
from reir.training.trainer import sample_to_row

CATEGORIES_KEY = "categories"  # in a checkpoint's training_args.json: label index -> name


@dataclass
class MixedData:
    """What the driver hands to Ray Train: the dataset and the facts to record."""

    dataset: Any  # ray.data.Dataset
    rows_per_epoch: int
    categories: list[str]
    config: TrainConfig  # num_classes raised to the label space when starting from a preset
    summary: list[dict[str, Any]] = field(default_factory=list)  # per source: kind, path, images, per_epoch


def epoch_counts(sizes: list[int], weights: list[float], epoch_size: int) -> list[int]:
    """Images each source gives to an epoch: shares of ``epoch_size`` by weight, rounded
    so that they add up exactly (largest remainder)."""
    if any(n <= 0 for n in sizes):
        raise ValueError(f"every source needs images; sizes {sizes}")
    total = sum(weights)
    exact = [epoch_size * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: epoch_size - sum(counts)]:
        counts[i] += 1
    return counts


def draw_epoch(sizes: list[int], counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Global row indices (sources concatenated in order) of one epoch, shuffled: every
    image of a source appears ``floor`` or ``ceil`` of count/size times."""
    offsets = np.cumsum([0, *sizes[:-1]])
    parts = []
    for offset, size, count in zip(offsets, sizes, counts):
        whole, rest = divmod(count, size)
        picks = [rng.permutation(size) for _ in range(whole)] + [rng.choice(size, rest, replace=False)]
        parts.append(np.concatenate(picks).astype(np.int64) + offset)
    plan = np.concatenate(parts)
    return plan[rng.permutation(len(plan))]


def mix_plan(sizes: list[int], weights: list[float], *, epoch_size: int, epochs: int, seed: int) -> np.ndarray:
    """``epochs`` independent draws, one after the other; the same seed gives the same plan."""
    counts = epoch_counts(sizes, weights, epoch_size)
    return np.concatenate([draw_epoch(sizes, counts, np.random.default_rng([seed, e])) for e in range(epochs)])


def mixed_dataset(rows: list[dict[str, Any]], plan: np.ndarray) -> Any:
    """A Ray Dataset whose i-th row is ``rows[plan[i]]``."""
    import pyarrow as pa
    import ray

    table_ref, plan_ref = ray.put(pa.Table.from_pylist(rows)), ray.put(plan)

    def take(batch: dict[str, np.ndarray]) -> pa.Table:
        return ray.get(table_ref).take(ray.get(plan_ref)[batch["id"]])

    return ray.data.range(len(plan)).map_batches(take, batch_format="numpy")


def _plan_epochs(cfg: TrainConfig, rows_per_epoch: int) -> int:
    """Epochs of fresh draws the run can consume; the worker loop repeats the plan if
    rounding leaves it short."""
    if not cfg.max_steps:
        return cfg.epochs
    per_step = cfg.batch_size * cfg.grad_accum * cfg.num_workers
    return max(1, math.ceil(cfg.max_steps * per_step / rows_per_epoch))


def start_label_space(model: str) -> LabelSpace:
    """Continue the label space of the checkpoint a run starts from (stage 2 after a mixed
    stage 1), so that its class head keeps meaning the same categories."""
    args = Path(model) / "training_args.json"
    if args.is_file():
        return LabelSpace(json.loads(args.read_text()).get(CATEGORIES_KEY, []))
    return LabelSpace()


def fit_num_classes(cfg: TrainConfig, num_categories: int) -> TrainConfig:
    """``vision.num_classes`` must cover every label: a preset is widened (recorded in
    ``model_overrides``); a checkpoint's head is fixed, so a wider label space is an error."""
    from reir.model.configuration import ReirConfig
    from reir.model.factory import apply_overrides, load_preset

    if Path(cfg.model).is_dir():
        have = ReirConfig.from_pretrained(cfg.model).vision_spec.num_classes
        if 0 < have < num_categories:
            raise ValueError(f"the sources have {num_categories} categories but {cfg.model} was trained with "
                             f"vision.num_classes={have}; start from a preset or drop sources")
        return cfg
    have = ReirConfig(**apply_overrides(load_preset(cfg.model), cfg.model_overrides)).vision_spec.num_classes
    if 0 < have < num_categories:  # 0: the model has no class head
        overrides = {**cfg.model_overrides, "vision__num_classes": num_categories}
        return cfg.model_copy(update={"model_overrides": overrides})
    return cfg


def _groups(spec: SourceSpec, samples: list[ImageSample], offset: int) -> list[int]:
    """Negative groups (see ``negative_groups``), unique across sources."""
    if spec.kind == "synthetic":
        groups = negative_groups(spec.path, spec.split, [s.image_id for s in samples])
    else:
        groups = list(range(len(samples)))
    return [offset + g for g in groups]


def load_sources(specs: list[SourceSpec], labels: LabelSpace) -> list[list[ImageSample]]:
    out = []
    for spec in specs:
        samples = load_source(spec.kind, spec.path, images=spec.images, instances=spec.instances, split=spec.split,
                              labels=labels)
        if not samples:
            raise ValueError(f"source {spec.kind}:{spec.path} has no images")
        out.append(samples)
    return out


def prepare_mixed(cfg: TrainConfig) -> MixedData:
    """Load ``cfg.sources`` into one label space and build the epochs' weighted dataset
    (stages ``rerank`` / ``weak-rerank`` / ``image-retrieval``: every image once, they make one pass to collect features)."""
    labels = start_label_space(cfg.model)
    per_source = load_sources(cfg.sources, labels)
    cfg = fit_num_classes(cfg, len(labels))
    rows: list[dict[str, Any]] = []
    for k, (spec, samples) in enumerate(zip(cfg.sources, per_source)):
        groups = _groups(spec, samples, offset=1 + max((r["group"] for r in rows), default=-1))
        rows += [{**sample_to_row(s, g), "source": k} for s, g in zip(samples, groups)]
    sizes = [len(s) for s in per_source]
    weights = [spec.weight for spec in cfg.sources]
    if cfg.trains_head:
        epoch_size, counts = len(rows), sizes
        plan = np.arange(len(rows), dtype=np.int64)
    else:
        epoch_size = cfg.epoch_size or sum(sizes)
        counts = epoch_counts(sizes, weights, epoch_size)
        plan = mix_plan(sizes, weights, epoch_size=epoch_size, epochs=_plan_epochs(cfg, epoch_size), seed=cfg.seed)
    summary = [{"kind": s.kind, "path": str(Path(s.path).resolve()), "split": s.split, "weight": s.weight,
                "images": n, "per_epoch": c} for s, n, c in zip(cfg.sources, sizes, counts)]
    return MixedData(mixed_dataset(rows, plan), epoch_size, labels.names, cfg, summary)


def record_sources(model_dir: Path, data: MixedData) -> None:
    """Add the label space and the sources' shares to the checkpoint's training_args.json."""
    path = model_dir / "training_args.json"
    args = json.loads(path.read_text()) if path.is_file() else {}
    args[CATEGORIES_KEY] = data.categories
    args["sources"] = data.summary
    path.write_text(json.dumps(args, indent=2, default=str))
