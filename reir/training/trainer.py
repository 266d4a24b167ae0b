"""Two-stage training on Ray Train (TorchTrainer) with DeepSpeed.

The driver turns the benchmark's training split into a Ray Dataset (one row per image)
and starts ``num_workers`` Ray Train workers. Each worker builds the model, wraps it in
a DeepSpeed engine (ZeRO stage from the config, gloo on CPU, NCCL + bf16 on GPU), reads
its shard of the dataset, and reports a checkpoint (a model directory that
``reir.model.create_model`` loads, plus the state to resume from) every
``checkpoint_every`` steps and at the end; resume, restarts after a failure and
evaluation during training live in :mod:`reir.training.operations`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from reir.data.formats import ImageSample, load_samples, negative_groups, test_queries
from reir.data.noise import add_filler
from reir.model.processing import NO_REFERENT
from reir.training.batching import window_batches
from reir.training.checkpointing import check_resumable, export_model, is_uri, join, local_copy
from reir.training.config import TrainConfig, deepspeed_config, head_deepspeed_config
from reir.training.operations import StepHook, TrainOps
from reir.training.precision import cpu_autocast_enabled, training_autocast

MODEL_DIRNAME = "model"


def sample_to_row(s: ImageSample, group: int = 0) -> dict[str, Any]:
    # Nested ragged lists go through Arrow as JSON text: simple and loss-free.
    return {
        "group": int(group),
        "image_id": s.image_id,
        "path": s.path,
        "width": int(s.width),
        "height": int(s.height),
        "boxes": json.dumps(s.boxes),
        "labels": json.dumps(s.labels),
        "refs": json.dumps([list(r) for r in s.refs]),
        "scene": int(s.scene),
    }


def row_to_sample(row: dict[str, Any]) -> ImageSample:
    return ImageSample(
        image_id=str(row["image_id"]),
        path=str(row["path"]),
        width=int(row["width"]),
        height=int(row["height"]),
        boxes=json.loads(row["boxes"]),
        labels=json.loads(row["labels"]),
        refs=[(str(t), int(i)) for t, i in json.loads(row["refs"])],
        scene=int(row.get("scene", -1)),
    )


# Carrier words never take an expression past this many tokens (special tokens included) unless
# it is that long already: a batch's longest expression sets the text tower's padded length, and
# unbounded they raised it from about 29 to 36 tokens, making stage 1 and 2 steps about 18% slower.
FILLER_MAX_TOKENS = 30
Fits = Callable[[Sequence[tuple[str, str]]], list[bool]]


def filler_fits(processor: Any, max_tokens: int = FILLER_MAX_TOKENS) -> Fits:
    """``fits([(text, with_filler), ...])``: for each pair, whether the longer text has at most
    ``max(max_tokens, tokens of text)`` tokens and is not cut by the processor (``max_length``).
    One tokenizer call for a whole batch's longer texts: one call per expression was about 4% of
    a stage-2 step on 2 cores."""
    cut = int(getattr(processor, "max_length", max_tokens))
    own_counts: dict[str, int] = {}  # the expressions come back every epoch: count each once

    def fits(pairs: Sequence[tuple[str, str]]) -> list[bool]:
        new = [t for t in dict.fromkeys(text for text, _ in pairs) if t not in own_counts]
        own_counts.update(zip(new, processor.token_counts(new)))
        counts = processor.token_counts([longer for _, longer in pairs])
        return [n <= min(max(max_tokens, own_counts[text]), cut) for (text, _), n in zip(pairs, counts)]

    return fits


def with_filler(samples: list[ImageSample], rate: float, rng: np.random.Generator,
                fits: Fits | None = None) -> list[ImageSample]:  # fmt: skip
    """``samples`` with each expression given carrier words (:func:`reir.data.noise.add_filler`)
    at ``rate`` (kept as it was where ``fits`` refuses the longer text); referents, boxes and
    the samples themselves are untouched."""
    if rate <= 0:
        return samples
    drawn = [[add_filler(t, rng) if rng.random() < rate else None for t, _ in s.refs] for s in samples]
    pairs = [(t, longer) for s, row in zip(samples, drawn) for (t, _), longer in zip(s.refs, row) if longer is not None]
    ok = iter(fits(pairs) if fits is not None and pairs else [True] * len(pairs))
    return [dataclasses.replace(s, refs=[(longer if longer is not None and next(ok) else t, j)
                                         for (t, j), longer in zip(s.refs, row)])
            for s, row in zip(samples, drawn)]  # fmt: skip


def _fill(text: str, rng: np.random.Generator, fits: Fits | None) -> str:
    longer = add_filler(text, rng)
    return longer if fits is None or fits([(text, longer)])[0] else text


def filler_rng(cfg: TrainConfig, rank: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, rank, 0xF111])


class ImageCache:
    """Decoded training images kept in memory after the first epoch (small galleries)."""

    def __init__(self, max_items: int = 20000) -> None:
        self._items: dict[str, Image.Image] = {}
        self._max = max_items

    def get(self, path: str) -> Image.Image:
        img = self._items.get(path)
        if img is None:
            with Image.open(path) as f:
                img = f.convert("RGB")
            if len(self._items) < self._max:
                self._items[path] = img
        return img


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel: one pass over all parameters instead of ~10 small
    ops per parameter. A step of the ``small`` model's optimizer on 2 CPU cores: 1.8 against
    6.4 ms (the for-loop torch picks on CPU) or 7 ms (``foreach``); the same update."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def _head_engine(head: torch.nn.Module, cfg: TrainConfig) -> Any:
    """A head-only stage's DeepSpeed engine: ``head`` with the trainer's AdamW (``cfg.lr``,
    ``cfg.weight_decay``) under :func:`head_deepspeed_config` (fp32, ZeRO 0)."""
    import deepspeed

    optimizer = adamw(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=head, optimizer=optimizer, config=head_deepspeed_config(cfg))
    return engine


def lr_factor(progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5% over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _progress(budget_s: float | None, step: int, total_steps: int, started: float) -> float:
    p = step / max(1, total_steps)
    if budget_s:
        p = max(p, (time.monotonic() - started) / budget_s)
    return p


def _agree(value: float, device: torch.device) -> float:
    """Every worker must take the same stop/LR decision, or collectives hang: use rank 0's."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        return float(t.item())
    return value


SCORE_PARAMS = ("logit_scale", "logit_bias")
TEXT_PREFIX = "text."  # ReirModel.text: the text encoder (tower + MORE + projection)


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Weights decay; norms, biases and the score's temperature/bias do not; the latter
    two learn ``score_lr_mult`` times faster, the text encoder ``text_lr_mult`` times
    (a pretrained text tower is usually fine-tuned gentler than the fresh detector).
    ``lr_mult`` is applied by the LR schedule."""
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr_mult": 1.0},
        "score": {"params": [], "weight_decay": 0.0, "lr_mult": cfg.score_lr_mult},
        "text_decay": {"params": [], "weight_decay": cfg.weight_decay, "lr_mult": cfg.text_lr_mult},
        "text_no_decay": {"params": [], "weight_decay": 0.0, "lr_mult": cfg.text_lr_mult},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "score" if name in SCORE_PARAMS else "decay" if p.ndim > 1 else "no_decay"
        if key != "score" and name.startswith(TEXT_PREFIX):
            key = f"text_{key}"
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def _build_engine(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> tuple[Any, Any, Any]:
    import deepspeed

    from reir.model import create_model
    from reir.model.losses import ReirCriterion

    model, processor = create_model(cfg.model, **cfg.applied_model_overrides)
    if cfg.loss_overrides:
        model.config.loss = {**model.config.loss, **cfg.loss_overrides}
    model.to(device)
    optimizer = adamw(_param_groups(model, cfg), lr=cfg.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    criterion = ReirCriterion(model.config, stage=cfg.stage, rank=rank, world_size=world)
    return engine, processor, criterion


def _set_lr(engine: Any, cfg: TrainConfig, progress: float, step: int) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_mult", 1.0) * lr_factor(progress, step, cfg.warmup_steps)


def _report(
    rank: int, model: Any, processor: Any, cfg: TrainConfig, stats: dict[str, Any],
    extra_files: dict[str, Any] | None = None,
) -> None:
    """Report ``stats`` with a checkpoint (a model directory, written by rank 0 only):
    Ray Train V2 keeps metrics only from reports that carry one."""
    import ray.train

    checkpoint = None
    if rank == 0:
        out = Path(tempfile.mkdtemp(prefix="reir-ckpt-"))
        model.save_pretrained(out)
        processor.save_pretrained(out)
        files = {"training_args.json": {"config": cfg.model_dump(), "stats": stats}, **(extra_files or {})}
        for name, content in files.items():
            (out / name).write_text(json.dumps(content, indent=2, default=str))
        checkpoint = ray.train.Checkpoint.from_directory(str(out))
    ray.train.report(stats, checkpoint=checkpoint)


def init_distributed(use_gpu: bool) -> None:
    """DeepSpeed's process group (nccl on GPU, gloo on CPU). On CPU, DeepSpeed would first
    compile its shared-memory all-reduce op, which only its inference all-reduce uses: 50-90 s
    of C++ on every fresh worker pod or machine (on 2 cores here), for nothing in training.
    The op is marked unavailable so the gloo group starts at once."""
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a dict DeepSpeed keeps for edits
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    # Ray sets OMP_NUM_THREADS to the worker's CPU count, rounded down (1 for 1.5 CPUs);
    # use every CPU the worker reserved, or half the compute sits idle.
    torch.set_num_threads(max(1, math.ceil(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    init_distributed(use_gpu=cfg.use_gpu)
    if cfg.trains_reranker:
        _rerank_loop(cfg, rank, world, device, loop_config.get("discovery") or [])
        return
    if cfg.stage == "image-retrieval":
        _image_retrieval_loop(cfg, rank, world, device)
        return
    engine, processor, criterion = _build_engine(cfg, rank, world, device)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    autocast = cpu_autocast_enabled(cfg.cpu_bf16, device)
    if rank == 0:
        print(f"[train stage {cfg.stage}] forward in {'bf16 autocast (CPU)' if autocast else dtype}", flush=True)
    rng = random.Random(cfg.seed + rank)
    fill, fits = filler_rng(cfg, rank), filler_fits(processor)
    ops = TrainOps(cfg=cfg, engine=engine, processor=processor, rank=rank, world=world, rng=rng,
                   fit_id=str(loop_config.get("fit_id", "")), step_hook=loop_config.get("step_hook"))
    state = ops.start_from(ray.train.get_checkpoint())

    shard = ray.train.get_dataset_shard("train")
    rows_per_worker = int(loop_config["num_rows"]) // world
    steps_per_epoch = max(1, rows_per_worker // (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    cache = ImageCache()
    # A resumed run continues the step count, the epoch (skipping the micro-batches it
    # already trained on) and the time budget's clock.
    # (``state`` moves on with every step: keep where this attempt started.)
    first_step, first_epoch, first_skip, resumed_s = state.step, state.epoch, state.micro_in_epoch, state.elapsed_s
    step, micro, samples_seen = first_step, first_step * cfg.grad_accum, 0
    started = time.monotonic() - resumed_s
    last: dict[str, float] = {}
    warm: tuple[float, int] | None = None  # (time, samples) at the end of this attempt's first step
    done = step >= total_steps
    for epoch in range(first_epoch, cfg.epochs if not cfg.max_steps else 10**6):
        if done:
            break
        skip = first_skip if epoch == first_epoch else 0
        micro_in_epoch = 0
        for samples in micro_batches(shard, cfg, epoch, rng):
            micro_in_epoch += 1
            if micro_in_epoch <= skip:
                continue
            images = [cache.get(s.path) for s in samples]
            samples = with_filler(samples, cfg.filler_rate, fill, fits)
            batch = processor.collate(samples, images, hflip_prob=0.5 if cfg.flip_augment else 0.0,
                                      vflip_prob=0.5 if cfg.vflip_augment else 0.0, rng=rng,
                                      max_refs_per_image=cfg.max_refs_per_image)
            batch = batch.to(device)
            batch.pixel_values = batch.pixel_values.to(dtype)
            with training_autocast(autocast):
                losses = criterion(engine.module, batch)
            engine.backward(losses["loss"])
            progress = _agree(_progress(cfg.time_budget_s, step, total_steps, started), device)
            _set_lr(engine, cfg, progress, step)
            engine.step()
            micro += 1
            samples_seen += len(samples)
            if micro % cfg.grad_accum:
                continue
            step += 1
            if warm is None:
                warm = (time.monotonic(), samples_seen)
            last = {k: float(v.detach()) for k, v in losses.items()}
            if rank == 0 and (step % cfg.log_every == 0 or step == 1):
                rate = samples_seen * world / max(1e-9, time.monotonic() - started - resumed_s)
                parts = " ".join(f"{k}={v:.3f}" for k, v in sorted(last.items()))
                print(f"[train stage {cfg.stage}] epoch {epoch} step {step}/{total_steps} {parts} "
                      f"{rate:.1f} samples/s", flush=True)
            done = step >= total_steps or progress >= 1.0
            ops.after_step(last, epoch=epoch, micro_in_epoch=micro_in_epoch,
                           elapsed_s=time.monotonic() - started, final=done)
            if done:
                break
        if done:
            break
    seconds = time.monotonic() - started
    stats = {"steps": step, "seconds": seconds, "samples_per_s": samples_seen * world / max(seconds - resumed_s, 1e-9),
             "world_size": world, "bf16_autocast": autocast, **last}
    stats.update(_steady_stats(warm, step - first_step, samples_seen, world, device))
    ops.finish(stats)


def micro_batches(shard: Any, cfg: TrainConfig, epoch: int, rng: random.Random) -> Iterator[list[ImageSample]]:
    """One epoch of the worker's shard as micro-batches of ``cfg.batch_size`` samples:
    shuffled rows, or with ``cfg.lookalike_partners`` look-alike clusters cut from
    windows of ``cfg.lookalike_window`` rows (``reir.training.batching``)."""
    if not cfg.lookalike_partners:
        for frame in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", local_shuffle_buffer_size=256,
                                        local_shuffle_seed=cfg.seed + epoch, drop_last=True):
            yield [row_to_sample(r) for r in frame.to_dict("records")]
        return
    windows = (
        [(row_to_sample(r), int(r["group"])) for r in frame.to_dict("records")]
        for frame in shard.iter_batches(batch_size=cfg.lookalike_window, batch_format="pandas",
                                        local_shuffle_buffer_size=max(256, cfg.lookalike_window),
                                        local_shuffle_seed=cfg.seed + epoch)
    )  # fmt: skip
    yield from window_batches(windows, cfg.batch_size, cfg.lookalike_partners, rng)


def _steady_stats(warm: tuple[float, int] | None, steps: int, samples_seen: int, world: int,
                  device: torch.device) -> dict[str, float]:
    """Rates after step 1 (which also pays for the data pipeline's start and lazy allocations,
    a large share of a short benchmark run) and, on GPU, this worker's peak memory."""
    out: dict[str, float] = {}
    if warm is not None and steps > 1:
        seconds = max(time.monotonic() - warm[0], 1e-9)
        out["steady_samples_per_s"] = (samples_seen - warm[1]) * world / seconds
        out["steady_step_s"] = seconds / (steps - 1)
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _rerank_loop(cfg: TrainConfig, rank: int, world: int, device: torch.device,
                 discovery: list[dict[str, Any]]) -> None:  # fmt: skip
    """Stages ``rerank`` and ``weak-rerank``: frozen model -> features of this worker's shard
    -> train the re-ranker (weak: its rows carry no referent box, the loss is over images).
    ``discovery``: training discovery queries (``[{"raw", "group"}]``; each row's
    ``"discovery"`` field has its matches): discover mode's presence loss, and its threshold
    calibrated on held-out ones."""
    from reir.model.modeling import score_scale
    from reir.training.rerank import (
        build_discovery_set,
        build_rerank_set,
        calibrate_discovery,
        calibrate_presence,
        calibration_split,
        discovery_loss,
        draw_negatives,
        mine_hard_negatives,
        rerank_loss,
        sample_discovery,
        sample_texts,
    )

    model, processor, reranker = _frozen_model_with_head(cfg, device, "rerank")
    # The re-ranker learns on the instance sets ingestion will store, and the checkpoint keeps
    # that policy (preprocessor_config.json) so that ingestion stores the same.
    if cfg.rerank_top_k is not None:
        processor.instance_top_k = cfg.rerank_top_k
    if cfg.rerank_min_score is not None:
        processor.instance_min_score = cfg.rerank_min_score
    rows = _shard_rows()
    fill, fits = filler_rng(cfg, rank), filler_fits(processor)
    samples = with_filler([row_to_sample(r) for r in rows], cfg.filler_rate, fill, fits)
    discovery = [{**d, "raw": _fill(d["raw"], fill, fits)} if fill.random() < cfg.filler_rate else d
                 for d in discovery]
    started = time.monotonic()
    # One pass over the shard: decoded images are not kept (max_items=0).
    rs = build_rerank_set(model, processor, samples, [int(r["group"]) for r in rows], ImageCache(max_items=0).get,
                          top_k=None, min_score=None, min_iou=cfg.rerank_min_iou, weak=cfg.without_referents)
    negatives = mine_hard_negatives(rs, max(cfg.rerank_negatives, cfg.rerank_negative_pool))
    why = "image without stored instances" if rs.weak else "referent not detected"
    if rank == 0:
        print(f"[train stage {cfg.stage}] features: {len(samples)} images, {rs.num_texts} expressions "
              f"({rs.skipped} skipped: {why}) in {time.monotonic() - started:.1f}s", flush=True)
    if rs.num_texts == 0:
        first = "train stage weak first" if rs.weak else "train stage 1/2 first"
        raise ValueError(f"stage {cfg.stage}: no expression can be scored ({rs.skipped} skipped: {why}); {first}")
    disc = None
    if discovery and not rs.weak and cfg.rerank_discovery_batch:
        disc = build_discovery_set(model, processor, rs, discovery,
                                   [json.loads(r.get("discovery") or "[]") for r in rows],
                                   [(s.width, s.height) for s in samples], min_iou=cfg.rerank_min_iou)
        if rank == 0:
            print(f"[train stage {cfg.stage}] discovery: {disc.num_queries} training queries, "
                  f"{int(disc.truth.sum())} matching images", flush=True)
    engine = _head_engine(reranker, cfg)
    scale, bias = float(score_scale(model.logit_scale)), float(model.logit_bias)
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    train_idx, held_idx = calibration_split(rs.text_image, cfg.rerank_calibration_every)
    total_steps = cfg.max_steps or max(1, cfg.epochs * rs.num_texts // cfg.batch_size)
    def batch_losses() -> dict[str, torch.Tensor]:
        idx = sample_texts(rs, train_idx, cfg.batch_size, gen)  # one group: shared hard negatives
        return rerank_loss(engine, rs, idx, draw_negatives(negatives[idx], cfg.rerank_negatives, gen), scale, bias,
                           device=device)

    presence_steps = cfg.rerank_discovery_steps if disc is not None else 0
    budget = first_phase_budget(cfg.time_budget_s, total_steps, PRESENCE_STEP_COST * presence_steps)
    step, seconds, last = _head_steps(engine, cfg, rank, total_steps, device, batch_losses, budget)
    reranker.eval()
    calib_idx = held_idx if held_idx.numel() else train_idx
    calibration = calibrate_presence(reranker, rs, calib_idx, negatives[calib_idx, : cfg.rerank_negatives], scale, bias,
                                     device=device)
    stored: dict[str, Any] = dict(calibration)
    if disc is not None:
        # Discover mode's own head, started from the trained re-ranker: one head for both tasks
        # cost rank mode 12 points of BR@1 on a demo model (32.4% -> 20.1%).
        presence = model.add_presence(image_term=cfg.rerank_presence_image_term)
        p_engine = _head_engine(presence, cfg)
        # Every N-th query calibrates the threshold, as every N-th image's expressions do above.
        disc_train, disc_held = calibration_split(torch.arange(disc.num_queries), cfg.rerank_calibration_every)

        def presence_losses() -> dict[str, torch.Tensor]:
            q, imgs = sample_discovery(disc, disc_train, cfg.rerank_discovery_batch, cfg.rerank_discovery_images, gen)
            return discovery_loss(p_engine, rs, disc, q, imgs, scale, bias, device=device)

        rest = cfg.time_budget_s and max(1.0, cfg.time_budget_s - seconds)  # what the re-ranker left
        p_steps, p_seconds, p_last = _head_steps(p_engine, cfg, rank, presence_steps, device, presence_losses, rest)
        presence.eval()
        found = calibrate_discovery(presence, rs, disc, disc_held if disc_held.numel() else disc_train, scale, bias,
                                    device=device, none_target=cfg.rerank_discovery_none_target)  # fmt: skip
        # Discover mode reads the threshold calibrated on its own task; the referent one stays for reference.
        stored = {"discover_threshold": found["discover_threshold"], "discover_gate": found["discover_gate"],
                  "source": "discovery queries",
                  "head": "presence", "discovery": found, "referent": calibration}
        calibration = {**calibration, **{f"discovery_{k}": v for k, v in found.items()}}
        last = {**last, **p_last, "presence_steps": p_steps, "presence_seconds": p_seconds}
        seconds += p_seconds
    stats = {"steps": step, "seconds": seconds, "world_size": world, "rerank_texts": rs.num_texts, **last,
             **{f"calibration_{k}": v for k, v in calibration.items()}}
    _report(rank, model, processor, cfg, stats, {"calibration.json": stored})


# A presence-head step against a re-ranker step, in time: 0.11 against 0.22 s in `make demo`
# (2 cores, 2026-11-29): the rerank stage's time budget is split by it.
PRESENCE_STEP_COST = 0.5


def first_phase_budget(total_s: float | None, steps: float, later_steps: float) -> float | None:
    """The first phase's seconds of a time budget two phases share (the rerank stage: the
    re-ranker, then the presence head on what it left): its share of the steps, each phase's
    steps counted in first-phase steps. ``None`` without a budget."""
    if not total_s:
        return None
    return total_s * steps / (steps + later_steps)


IMAGE_RETRIEVAL_TEXTS_PER_IMAGE = 4  # expressions of each batch image per step (cfg.batch_size: images)
IMAGE_RETRIEVAL_HELD_OUT_EVERY = 10  # every 10th image's expressions measure held-out recall


def _image_retrieval_loop(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> None:
    """Stage ``image-retrieval``: frozen model -> token grids and expression features of this
    worker's shard -> train the image-level retrieval head (reir.training.image_retrieval)."""
    from reir.training.image_retrieval import (
        build_image_retrieval_set,
        group_recall,
        image_retrieval_step,
        sample_image_batch,
    )
    from reir.training.rerank import calibration_split

    model, processor, head = _frozen_model_with_head(cfg, device, "image_retrieval")
    rows = _shard_rows()
    started = time.monotonic()
    samples = with_filler([row_to_sample(r) for r in rows], cfg.filler_rate, filler_rng(cfg, rank), filler_fits(processor))
    rs = build_image_retrieval_set(model, processor, samples, [int(r["group"]) for r in rows],
                                   ImageCache(max_items=0).get)  # fmt: skip
    if rank == 0:
        print(f"[train stage {cfg.stage}] features: {len(rows)} images, {rs.num_texts} expressions "
              f"in {time.monotonic() - started:.1f}s", flush=True)
    if rs.num_texts == 0:
        raise ValueError(f"stage {cfg.stage}: the training images have no expressions")
    train_idx, held_idx = calibration_split(rs.text_image, IMAGE_RETRIEVAL_HELD_OUT_EVERY)
    allowed = torch.zeros(rs.num_texts, dtype=torch.bool)
    allowed[train_idx] = True
    engine = _head_engine(head, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    total_steps = cfg.max_steps or max(1, cfg.epochs * rs.num_texts // (cfg.batch_size * IMAGE_RETRIEVAL_TEXTS_PER_IMAGE))
    def batch_losses() -> dict[str, torch.Tensor]:
        images, texts = sample_image_batch(rs, cfg.batch_size, IMAGE_RETRIEVAL_TEXTS_PER_IMAGE, gen, allowed)
        return image_retrieval_step(engine, rs, images, texts, device=device)

    step, seconds, last = _head_steps(engine, cfg, rank, total_steps, device, batch_losses, cfg.time_budget_s)
    head.eval()
    recall = group_recall(head, rs, held_idx if held_idx.numel() else train_idx, device=device)
    stats = {"steps": step, "seconds": seconds, "world_size": world, "image_retrieval_texts": rs.num_texts,
             **last, **{f"held_out_{k}": v for k, v in recall.items()}}
    _report(rank, model, processor, cfg, stats)


def without_referents(row: dict[str, Any]) -> dict[str, Any]:
    """The weak-supervision view of a training row: its expressions keep their image and
    lose their box index (``NO_REFERENT``).

    Applied to every row before it reaches the workers, whatever the source, so
    nothing in the weak stage can read a referent box. The image's boxes stay (detection,
    when ``weak_detection``).
    """
    refs = [[text, NO_REFERENT] for text, _ in json.loads(row["refs"])]
    return {**row, "refs": json.dumps(refs)}


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray Train workers run in their own working directory: a relative checkpoint path
    would not be found there (and would be mistaken for a preset name)."""
    updates: dict[str, Any] = {"data_root": str(Path(cfg.data_root).resolve()) if cfg.data_root else "",
                               "extra_train_roots": [str(Path(r).resolve()) for r in cfg.extra_train_roots],
                               "output_dir": cfg.output_dir if is_uri(cfg.output_dir)
                               else str(Path(cfg.output_dir).resolve())}
    if Path(cfg.model).exists():
        updates["model"] = str(Path(cfg.model).resolve())
    return cfg.model_copy(update=updates)


# Blocks of the training rows per worker. Ray Data's default cuts 1,600 rows into 200 blocks of
# 8, fetched one by one from the split coordinator; 2 per worker made a stage-1 step about 2%
# faster through Ray Train on 2 cores (0.313 / 0.316 against 0.321 / 0.322 s, two interleaved
# pairs of 150 steps, 2026-11-29: within the noise of such pairs, and no slower).
TRAIN_BLOCKS_PER_WORKER = 2


def train_blocks(cfg: TrainConfig) -> int:
    """Blocks of the benchmark's training rows (``TRAIN_BLOCKS_PER_WORKER`` per worker)."""
    return TRAIN_BLOCKS_PER_WORKER * max(1, cfg.num_workers)


def first_train_images(samples: list[ImageSample], n: int | None) -> list[ImageSample]:
    """The first ``n`` of ``samples`` by image id (all when ``n`` is None). A synthetic
    benchmark's negative groups are chunks in image-id order, so they stay whole but the last."""
    if n is None:
        return samples
    if n > len(samples):
        raise ValueError(f"train_images {n}: the train split holds {len(samples)} images")
    return sorted(samples, key=lambda s: s.image_id)[:n]


EXTRA_ID_PREFIX = "extra{k}/"  # TrainConfig.extra_train_roots: image k's ids, unique beside data_root's


def extra_train_samples(roots: list[str], first_group: int) -> tuple[list[ImageSample], list[int]]:
    """The train splits of the benchmarks ``roots`` (``TrainConfig.extra_train_roots``): their
    samples, ids prefixed, and negative groups numbered from ``first_group`` on."""
    samples: list[ImageSample] = []
    groups: list[int] = []
    for k, root in enumerate(roots):
        more = load_samples(root, "train")
        if not more:
            raise ValueError(f"extra_train_roots: no training images under {root}")
        own = negative_groups(root, "train", [s.image_id for s in more])
        offset = max(groups) + 1 if groups else first_group
        prefix = EXTRA_ID_PREFIX.format(k=k)
        samples += [dataclasses.replace(s, image_id=prefix + s.image_id) for s in more]
        groups += [offset + g for g in own]
    return samples, groups


def _benchmark_dataset(cfg: TrainConfig) -> tuple[Any, int, list[dict[str, Any]]]:
    """Without ``cfg.sources``: the train split of ``data_root``, every image once per epoch;
    stage ``rerank`` also gets the training discovery queries of ``discovery.json`` (each
    row's ``"discovery"`` field: its matches, ``[[query index, xywh], ...]``)."""
    import ray

    samples = load_samples(cfg.data_root, "train")
    if not samples:
        raise ValueError(f"no training images under {cfg.data_root}")
    samples = first_train_images(samples, cfg.train_images)
    groups = negative_groups(cfg.data_root, "train", [s.image_id for s in samples])
    if cfg.extra_train_roots:  # their prefixed ids match no discovery query: every such row gets "[]"
        more, more_groups = extra_train_samples(cfg.extra_train_roots, max(groups) + 1)
        samples, groups = samples + more, groups + more_groups
    rows = [sample_to_row(s, g) for s, g in zip(samples, groups)]
    if cfg.without_referents:  # here, not as a Ray Data map: its tasks would each start a process that imports torch
        rows = [without_referents(r) for r in rows]
    discovery: list[dict[str, Any]] = []
    if cfg.stage == "rerank" and cfg.rerank_discovery_batch and (Path(cfg.data_root) / "discovery.json").is_file():
        from reir.data.formats import load_discovery
        from reir.training.rerank import discovery_rows

        discovery, per_image = discovery_rows(load_discovery(cfg.data_root), [s.image_id for s in samples], groups)
        for row in rows:
            row["discovery"] = json.dumps(per_image.get(row["image_id"], []))
    return ray.data.from_items(rows, override_num_blocks=train_blocks(cfg)), len(samples), discovery


PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# How long torch's OpenMP threads (libgomp) spin for the next parallel region before they
# sleep. libgomp's default (300,000 turns) puts them to sleep between most of a CPU step's
# small ops, and a futex wake-up then precedes each; in a Ray Train worker a re-ranker step
# took 13-20% longer than at 30M turns (measured interleaved, docs/decisions.md). Finite,
# unlike OMP_WAIT_POLICY=active, so an idle worker still sleeps, and libgomp's own short
# spin still applies when threads outnumber CPUs. Set either variable in the driver's
# environment to choose another.
OMP_ENV_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
CPU_OMP_SPINCOUNT = "30000000"


def worker_env_vars(use_gpu: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables the training workers start with: the driver's OpenMP wait
    settings when it has any, else, on CPU, ``GOMP_SPINCOUNT`` (above)."""
    environ = os.environ if environ is None else environ
    chosen = {k: environ[k] for k in OMP_ENV_VARS if k in environ}
    if chosen or use_gpu:
        return chosen
    return {"GOMP_SPINCOUNT": CPU_OMP_SPINCOUNT}


def run_training(
    cfg: TrainConfig, *, echo: Callable[[str], None] = print, step_hook: StepHook | None = None,
) -> Path | str:
    """Train one stage; returns the model directory ``{output_dir}/{run_name}/model``
    (a ``Path``, or a URI string when ``output_dir`` is a URI).

    Ray Train keeps the run's checkpoints under ``{output_dir}/ray/{run_name}``; a worker
    group that fails is restarted (``max_failures``) from the latest of them. ``step_hook``
    runs in every worker after every optimizer step of stages 1 and 2 (it must pickle)."""
    cfg = with_absolute_paths(cfg)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from reir.platform.raylocal import init_ray

    init_ray()  # RAY_ADDRESS or a local instance, never a dead cluster Ray's address file names

    storage = join(cfg.output_dir, "ray")
    if cfg.resume:
        check_resumable(cfg, join(storage, cfg.run_name))
    if cfg.eval_every and not test_queries(cfg.data_root):
        raise ValueError(f"eval_every: {cfg.data_root}/reircoco.json has no test-split queries to evaluate on")
    # The trainer prints its own progress; Ray Data's per-operator bars would drown it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    mixed, discovery = None, []
    if cfg.sources:
        from reir.training.mixing import prepare_mixed

        mixed = prepare_mixed(cfg)
        cfg, ds, num_rows = mixed.config, mixed.dataset, mixed.rows_per_epoch
        if cfg.without_referents:
            ds = ds.map(without_referents)
    else:
        ds, num_rows, discovery = _benchmark_dataset(cfg)
    # Ray Train routes a worker's print() through its logger, and, since Ray has replaced the
    # worker's sys.stdout, through the original print as well: every progress line reached the
    # driver twice, once on stdout and once on stderr (Ray 2.60). The controller and workers
    # read this from the driver's environment; a value set by hand wins.
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "num_rows": num_rows, "fit_id": uuid.uuid4().hex,
                           "step_hook": step_hook, "discovery": discovery},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage,
                             worker_runtime_env={"env_vars": worker_env_vars(cfg.use_gpu)},
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)),
        datasets={"train": ds},
    )
    echo(f"training stage {cfg.stage}: {num_rows} images{' per epoch' if mixed else ''}, {cfg.num_workers} worker(s), "
         f"ZeRO {cfg.zero_stage}, model {cfg.model}")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run_name} produced no checkpoint: {result.error}")
    model_dir = join(cfg.output_dir, cfg.run_name, MODEL_DIRNAME)
    export_model(result.checkpoint.filesystem, result.checkpoint.path, model_dir)
    if mixed is not None:
        from reir.training.mixing import record_sources

        with local_copy(model_dir, "training_args.json") as local_dir:
            record_sources(local_dir, mixed)
    echo(f"checkpoint: {model_dir} ({json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()})})")
    return model_dir if is_uri(model_dir) else Path(model_dir)


# The head each head-only stage trains: model config key -> (attribute, method that adds a new one).
_HEADS = {"rerank": ("reranker", "add_reranker"), "image_retrieval": ("image_retrieval", "add_image_retrieval")}


def _frozen_model_with_head(cfg: TrainConfig, device: Any, key: str) -> tuple[Any, Any, Any]:
    """The checkpoint, frozen, and its ``key`` head trainable: the stored head, or a new one when
    ``model_overrides[key]`` names its fields (or the checkpoint has none)."""
    from reir.model import create_model

    overrides = dict(cfg.model_overrides)
    spec = dict(overrides.pop(key, {}) or {})
    model, processor = create_model(cfg.model, **overrides)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    attribute, add = _HEADS[key]
    head = getattr(model, attribute)
    if head is None or spec:
        head = getattr(model, add)(**spec)
    head.train()
    for p in head.parameters():
        p.requires_grad_(True)
    return model, processor, head


def _shard_rows() -> list[dict[str, Any]]:
    """This worker's whole training shard as row dicts (the head-only stages read it once)."""
    import ray.train

    return [r for frame in ray.train.get_dataset_shard("train").iter_batches(batch_size=256, batch_format="pandas")
            for r in frame.to_dict("records")]


def _head_steps(engine: Any, cfg: TrainConfig, rank: int, total_steps: int, device: Any,
                batch_losses: Callable[[], dict[str, torch.Tensor]],
                budget_s: float | None) -> tuple[int, float, dict[str, float]]:  # fmt: skip
    """A head-only stage's optimisation loop until ``total_steps`` or ``budget_s`` seconds:
    (steps, seconds, the last step's losses)."""
    step, started, last = 0, time.monotonic(), {}
    while True:
        losses = batch_losses()
        engine.backward(losses["loss"])
        progress = _agree(_progress(budget_s, step, total_steps, started), device)
        _set_lr(engine, cfg, progress, step)
        engine.step()
        step += 1
        last = {k: float(v.detach()) for k, v in losses.items()}
        if rank == 0 and (step % cfg.log_every == 0 or step == 1):
            parts = " ".join(f"{k}={v:.3f}" for k, v in sorted(last.items()))
            print(f"[train stage {cfg.stage}] step {step}/{total_steps} {parts}", flush=True)
        if step >= total_steps or progress >= 1.0:
            return step, time.monotonic() - started, last
