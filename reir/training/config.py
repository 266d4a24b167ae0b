"""Typed configuration of a training run, and the DeepSpeed config derived from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

SourceKind = Literal["synthetic", "reircoco", "refcoco", "sorec", "coco"]


class SourceSpec(BaseModel):
    """One training data source (``reir.data.formats.load_source``) and its share of an epoch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SourceKind
    path: str = Field(description="synthetic: the benchmark dir; refcoco: refs(*).p; reircoco, sorec, coco: the json")
    images: str | None = Field(None, description="image root (default: the folder of path)")
    instances: str | None = Field(None, description="COCO instances json joined to reircoco / refcoco files "
                                  "(refcoco default: instances.json beside the pickle)")
    split: str = Field("train", description="records of synthetic / reircoco / refcoco files to use")
    weight: float = Field(1.0, gt=0, description="share of each epoch, relative to the other sources' weights")

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        """``KIND:PATH[:WEIGHT]``, the form of ``reir train --source``."""
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(f"source {text!r}: expected KIND:PATH[:WEIGHT]")
        path, weight = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass  # a colon inside the path
        return cls.model_validate({"kind": kind, "path": path, "weight": weight})


Stage = Literal["1", "2", "rerank", "weak", "weak-rerank", "image-retrieval"]
CpuBf16 = Literal["auto", "on", "off"]  # TrainConfig.cpu_bf16, see reir.training.precision
STAGES: tuple[str, ...] = get_args(Stage)


class TrainConfig(BaseModel):
    """One training run: a stage of the two-stage recipe on one data root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_root: str = Field("", description="synthetic benchmark directory (reir synth --out); unused with sources")
    model: str = Field("small", description="preset name or model directory to start from")
    stage: Stage = Field(
        "1", description="1: detection + REC; 2: adds CLIA; rerank: the re-ranker on a frozen stage-2 model; "
        "weak: (image, expression) pairs without referent boxes (detection + MIL contrast); weak-rerank: the "
        "re-ranker on a frozen weak model, from the same pairs (multiple-instance loss over images); image-retrieval: "
        "an image-level retriever (one vector per image) on a frozen model, the two-stage baseline's first stage")
    output_dir: str = "runs"
    run_name: str = "reir"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1, description="micro-batch of images per worker")
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(10, ge=1, description="passes over the data; a run stops at the first of epochs "
                        "(or max_steps) and time_budget_s")
    max_steps: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="stop (and finish the LR schedule) by then; the rerank "
                                         "stage's re-ranker and presence head share it")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    score_lr_mult: float = Field(
        20.0, gt=0, description="LR multiplier for the score's temperature and bias: at the base LR "
        "they barely leave their SigLIP init in a short run, which caps every logit near 0")
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool = Field(True, description="bf16 on GPU (DeepSpeed's bf16 mode); on CPU see cpu_bf16")
    cpu_bf16: CpuBf16 = Field(
        "auto", description="stages 1, 2 and weak on CPU: the forward under torch.autocast(bf16), the losses in "
        "fp32 (reir.training.precision). auto: on where the CPU multiplies bf16 in hardware (AMX tiles or AVX-512 "
        "BF16), where a stage-2 step ran 1.24-1.5x faster; elsewhere bf16 is emulated and slower")
    flip_augment: bool = Field(True, description="flip half the images horizontally (\"left\" / \"right\" "
                               "swapped in their expressions)")
    vflip_augment: bool = Field(False, description="also flip half the images vertically (\"above\" / "
                                "\"below\", \"topmost\" / \"bottommost\" swapped): for images without a natural "
                                "up (synthetic scenes, aerial or microscope views), not for photographs")
    filler_rate: float = Field(
        0.25, ge=0, le=1, description="share of training expressions given a few carrier words (\"where\", "
        "\"can you\", \"please\", ...; reir.data.noise.FILLER_WORDS) before or after them, drawn anew each "
        "time in stages 1, 2 and weak, once per expression in the heads' stages: the model learns to ignore "
        "words outside the description, whatever wrapper a person types")
    max_refs_per_image: int | None = Field(
        12, ge=1, description="stages 1, 2 and weak: at most this many of an image's expressions per step, "
        "drawn at random (a benchmark with several phrasings per referent has dozens per image); null: all")
    lookalike_partners: int = Field(
        0, ge=0, description="stages 1, 2 and weak: each image of a micro-batch comes with up to this many "
        "images of its negative group whose expressions begin alike (hard negatives for the cross-batch "
        "losses); 0: random batches")
    lookalike_window: int = Field(512, ge=2, description="rows of the shard among which look-alikes are chosen")
    seed: int = 0
    log_every: int = Field(20, ge=1)
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    rerank_negatives: int = Field(15, ge=0, description="hard negative images per expression (stages rerank, weak-rerank)")
    rerank_negative_pool: int = Field(
        49, ge=0, description="stages rerank, weak-rerank: each step draws the rerank_negatives of an expression at "
        "random from the images the dual encoder ranks first among this many, as serving re-ranks the first "
        "rerank_candidates (50) images; 0 or <= rerank_negatives: always the hardest. On two demo models: BR@1 "
        "40.1 / 33.8% against 31.0 / 30.7% with the 15 hardest")
    rerank_top_k: int | None = Field(None, ge=1, description="instances stored per image at most, as ingestion "
                                     "stores them; written into the checkpoint [the model's processor: 16 for a new "
                                     "model]")
    rerank_min_score: float | None = Field(None, ge=0, lt=1, description="objectness floor of a stored instance past an "
                                           "image's first, as ingestion applies it; written into the checkpoint "
                                           "[the model's processor: 0.1 for a new model]")
    rerank_min_iou: float = Field(0.5, ge=0, le=1, description="a referent counts as stored when an instance "
                                  "overlaps it by this IoU; other expressions are skipped")
    rerank_calibration_every: int = Field(
        10, ge=0, description="stages rerank, weak-rerank: the expressions of every N-th image are held out of "
        "training to calibrate the presence threshold; 0: none held out, calibrated on training expressions")
    rerank_discovery_batch: int = Field(
        32, ge=0, description="stage rerank: training discovery queries (data_root's discovery.json, split train) "
        "per step of discover mode's presence head, trained after the re-ranker and started from it; 0: no head")
    rerank_discovery_images: int = Field(16, ge=2, description="stage rerank: images scored per discovery query "
                                         "and step (up to half of them matching, the rest hard non-matching)")
    rerank_discovery_steps: int = Field(3000, ge=1, description="stage rerank: optimizer steps of the presence "
                                        "head (the stage's time budget applies to it again)")
    rerank_presence_image_term: bool = Field(
        True, description="stage rerank: the presence head also scores the expression against the projected mean "
        "of the image's stored vectors (discover F1 +3.7 points over two seeds, docs/model.md)")
    rerank_discovery_none_target: float = Field(
        0.9, ge=0.0, le=1.0, description="stage rerank: discover mode's query-level gate (a query whose best image "
        "is under it answers nothing) is the one with the best joint score among those whose none-accuracy on the "
        "held-out discovery queries reaches this share; 0: the joint-best gate")
    sources: list[SourceSpec] = Field(default_factory=list, description="data sources mixed by weight; empty: "
                                      "data_root's train split, every image once per epoch")
    train_images: int | None = Field(
        None, ge=1, description="train on the first N images of data_root's train split (by image id; its first "
        "N / chunk negative groups of a synthetic benchmark); None: all. `make demo` trains stages 1 and 2 on "
        "part of the split and the re-ranker on all of it")
    extra_train_roots: list[str] = Field(
        default_factory=list, description="more synthetic benchmark directories whose train splits join data_root's "
        "(their images' ids get the prefix 'extraK/', their chunks negative groups of their own, no discovery "
        "queries). `make demo` gives the re-ranker images stages 1 and 2 never saw")
    epoch_size: int | None = Field(None, ge=1, description="images drawn per epoch from the sources "
                                   "(default: as many as they hold together)")
    loss_overrides: dict[str, Any] = Field(
        default_factory=dict, description="LossSpec fields for this run (weights, weak_* thresholds, "
        "weak_detection); unlike model_overrides they also apply to a checkpoint (no weights change) "
        "and are saved in the new checkpoint's config")
    text_lr_mult: float = Field(1.0, gt=0, description="LR multiplier for the text encoder's parameters")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also report a resumable checkpoint every N optimizer steps (stages 1 and 2)")
    checkpoints_to_keep: int = Field(2, ge=1, description="newest checkpoints kept in the run's storage")
    resume: bool = Field(False, description="continue from the latest checkpoint of run_name (stages 1 and 2)")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1: no limit")
    eval_every: int | None = Field(
        None, ge=1, description="rank 0 evaluates on the held-out split every N steps and at the end (stages 1, 2)")
    eval_max_queries: int = Field(64, ge=1, description="held-out queries per evaluation (first N, fixed)")
    eval_max_images: int = Field(64, ge=1, description="held-out gallery images per evaluation: the queries' "
                                 "images first, then others as distractors")

    @property
    def trains_reranker(self) -> bool:
        """Stages ``rerank`` and ``weak-rerank``: a frozen model, the re-ranker head trains."""
        return self.stage in ("rerank", "weak-rerank")

    @property
    def trains_head(self) -> bool:
        """Stages that freeze the model, make one pass for features and train a head on them:
        the re-ranker stages and ``image-retrieval``."""
        return self.trains_reranker or self.stage == "image-retrieval"

    @property
    def applied_model_overrides(self) -> dict[str, Any]:
        """``model_overrides`` as the run applies them to a preset: stage ``weak`` adds the
        appearance head (``vision.appearance_head``) unless the preset or the overrides (in
        any form ``apply_overrides`` takes) name it, because without referent boxes nothing
        else teaches the instances colour (docs/model.md, weak mode). A checkpoint keeps its own
        architecture (and refuses any model override)."""
        from reir.model.factory import apply_overrides, load_preset

        overrides = dict(self.model_overrides)
        if self.stage != "weak" or Path(self.model).is_dir():
            return overrides
        if "appearance_head" in apply_overrides(load_preset(self.model), overrides).get("vision", {}):
            return overrides
        return {**overrides, "vision__appearance_head": True}

    @property
    def without_referents(self) -> bool:
        """Stages ``weak`` and ``weak-rerank``: no referent box reaches the workers."""
        return self.stage in ("weak", "weak-rerank")

    @model_validator(mode="after")
    def _needs_data(self) -> TrainConfig:
        if not self.data_root and not self.sources:
            raise ValueError("no training data: set data_root or sources")
        if self.train_images is not None and self.sources:
            raise ValueError("train_images picks from data_root's train split; with sources use epoch_size")
        if self.extra_train_roots and self.sources:
            raise ValueError("extra_train_roots join data_root's train split; with sources add them as sources")
        return self

    @model_validator(mode="after")
    def _known_loss_fields(self) -> TrainConfig:
        from reir.model.configuration import LossSpec

        unknown = set(self.loss_overrides) - {f.name for f in fields(LossSpec)}
        if unknown:
            raise ValueError(f"loss_overrides: unknown LossSpec fields {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _operations_fit(self) -> TrainConfig:
        if self.trains_head and (self.resume or self.checkpoint_every or self.eval_every):
            raise ValueError(f"resume, checkpoint_every and eval_every apply to stages 1, 2 and weak; "
                             f"stage {self.stage} is short and reports one checkpoint at the end")
        if self.eval_every and not self.data_root:
            raise ValueError("eval_every evaluates on data_root's test split: set data_root too")
        if self.rerank_calibration_every == 1:
            raise ValueError("rerank_calibration_every 1 would hold every expression out of training: "
                             "use 0 (none held out) or 2 and more")
        return self


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg``; the optimizer itself is built by the trainer."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bool(cfg.use_gpu and cfg.bf16)},
        "steps_per_print": 10**9,  # the trainer logs on its own schedule
        "wall_clock_breakdown": False,
    }


def head_deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config of the head-only stages (re-ranker, presence head, image retriever):
    fp32 and ZeRO stage 0 whatever ``cfg.zero_stage`` says. A head has a few hundred thousand
    parameters and reads fp32 features; ZeRO's partitioned flat buffers save nothing at that
    size and cost time: a re-ranker step on 2 cores took 0.123 s at ZeRO 2 against 0.112 s at 0
    (400 steps each, same features, 2026-11-28)."""
    return {**deepspeed_config(cfg), "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}
