"""What happens around the optimizer step of stages 1 and 2 to make a run operable: resume
from the latest checkpoint, a checkpoint every ``checkpoint_every`` steps, evaluation on
the held-out split every ``eval_every`` steps, the metric history and its plot.

The training loop calls :meth:`TrainOps.start` once, :meth:`TrainOps.after_step` after
every optimizer step and :meth:`TrainOps.finish` at the end, on every rank: checkpoints
and ZeRO-3 weight gathering are collectives.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reir.training.checkpointing import (
    STATE_FILE,
    TRAIN_STATE_DIR,
    FullWeights,
    TrainState,
    restore_checkpoint,
    write_checkpoint,
)
from reir.training.config import TrainConfig
from reir.training.validation import HeldOutSet, evaluate_held_out, plot_curves, prefixed

CURVES_FILE = "training_curves.png"
HISTORY_FILE = "metrics_history.json"


@dataclass(frozen=True)
class StepInfo:
    """What a step hook learns after each optimizer step (on every rank)."""

    step: int
    rank: int
    world_size: int
    resumed_from: int | None  # the step this worker group started from, None for a fresh start


StepHook = Callable[[StepInfo], None]


class TrainOps:
    """Resume, periodic checkpoints and held-out evaluation for one worker of one run."""

    def __init__(
        self, *, cfg: TrainConfig, engine: Any, processor: Any, rank: int, world: int, rng: random.Random,
        fit_id: str, step_hook: StepHook | None = None,
    ) -> None:
        self.cfg, self.engine, self.processor = cfg, engine, processor
        self.rank, self.world, self.rng = rank, world, rng
        self.full = FullWeights(engine, zero_stage=cfg.zero_stage, rank=rank)
        self.state = TrainState(world_size=world, stage=cfg.stage, fit_id=fit_id)
        self.resumed_from: int | None = None
        self.step_hook = step_hook
        self.held_out: HeldOutSet | None = None
        if cfg.eval_every and rank == 0:
            self.held_out = HeldOutSet.load(cfg.data_root, max_queries=cfg.eval_max_queries,
                                            max_images=cfg.eval_max_images)
        self._window: dict[str, list[float]] = {}
        self.last_eval: dict[str, float] = {}

    def start_from(self, checkpoint: Any) -> TrainState:
        """:meth:`start` from a Ray Train checkpoint (``ray.train.get_checkpoint()``) or None."""
        if checkpoint is None:
            return self.start(None)
        with checkpoint.as_directory() as local:  # remote storage: downloaded for the duration
            return self.start(local)

    def start(self, checkpoint_dir: str | None) -> TrainState:
        """Continue from ``checkpoint_dir`` (Ray's latest) when it belongs to this fit (a
        restart after a failure) or ``cfg.resume`` asks for it; otherwise start at step 0."""
        if checkpoint_dir is None:
            return self.state
        saved = _peek(checkpoint_dir)
        if not self.cfg.resume and saved.fit_id != self.state.fit_id:
            if self.rank == 0:
                print(f"[train] {self.cfg.run_name}: starting at step 0 (not resuming the earlier run's "
                      f"step-{saved.step} checkpoint: pass --resume for that)", flush=True)
            return self.state
        if saved.world_size != self.world:
            raise ValueError(f"{checkpoint_dir}: written by {saved.world_size} workers, this run has {self.world}: "
                             "resume with the same num_workers (ZeRO shards the optimizer per worker)")
        fit_id = self.state.fit_id
        self.state = restore_checkpoint(self.engine, checkpoint_dir, rank=self.rank, rng=self.rng)
        self.state.fit_id = fit_id
        self.resumed_from = self.state.step
        self.last_eval = dict(self.state.history["eval"][-1]) if self.state.history["eval"] else {}
        self.last_eval.pop("step", None)
        if self.rank == 0:
            print(f"[train] {self.cfg.run_name}: resumed at step {self.state.step} (epoch {self.state.epoch}) "
                  f"from {checkpoint_dir}", flush=True)
        return self.state

    def after_step(self, losses: dict[str, float], *, epoch: int, micro_in_epoch: int, elapsed_s: float,
                   final: bool) -> None:
        """Record the step; evaluate and checkpoint on schedule (the final step's are left
        to :meth:`finish`)."""
        st = self.state
        st.step += 1
        st.epoch, st.micro_in_epoch, st.elapsed_s = epoch, micro_in_epoch, elapsed_s
        for k, v in losses.items():
            self._window.setdefault(k, []).append(v)
        if st.step % self.cfg.log_every == 0 or final:
            st.history["train"].append({"step": st.step, **{k: sum(v) / len(v) for k, v in self._window.items()}})
            self._window = {}
        if self.step_hook is not None:
            self.step_hook(StepInfo(st.step, self.rank, self.world, self.resumed_from))
        if final:
            return
        if self.cfg.eval_every and st.step % self.cfg.eval_every == 0:
            self._evaluate()
        if self.cfg.checkpoint_every and st.step % self.cfg.checkpoint_every == 0:
            self.report({"steps": st.step, "epoch": epoch, **losses})

    def _evaluate(self) -> None:
        model = self.full.get()  # every rank: gathering ZeRO-3 slices is a collective
        if self.rank != 0 or self.held_out is None:
            return
        started = time.monotonic()
        self.last_eval = prefixed(evaluate_held_out(model, self.processor, self.held_out))
        self.state.history["eval"].append({"step": self.state.step, **self.last_eval})
        shown = " ".join(f"{k[len('eval_'):]}={v:.3f}" for k, v in self.last_eval.items()
                         if k.endswith("@0.5") and ("BR@1@" in k or "BR@10@" in k or "REC" in k))
        print(f"[eval stage {self.cfg.stage}] step {self.state.step} {shown} "
              f"({len(self.held_out.queries)} queries, {len(self.held_out.images)} images, "
              f"{time.monotonic() - started:.1f}s)", flush=True)

    def report(self, stats: dict[str, Any], *, final: bool = False) -> None:
        """Write and report a checkpoint with ``stats`` and the latest held-out metrics
        (every rank; Ray Train merges the ranks' uploads into one directory). The final
        one also holds the metric history and its curves."""
        import ray.train

        model = self.full.get()
        metrics = {**stats, **self.last_eval}
        files: dict[str, Any] = {"training_args.json": {"config": self.cfg.model_dump(), "stats": metrics}}
        if final:
            files[HISTORY_FILE] = self.state.history
        local = write_checkpoint(self.engine, model, self.processor, self.state, files, rank=self.rank, rng=self.rng)
        if final and self.rank == 0:
            plot_curves(self.state.history, Path(local) / CURVES_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         delete_local_checkpoint_after_upload=True)

    def finish(self, stats: dict[str, Any]) -> None:
        """Final evaluation (unless this step had one), then the final checkpoint."""
        evals = self.state.history["eval"]
        if self.cfg.eval_every and (not evals or evals[-1]["step"] != self.state.step):
            self._evaluate()
        self.report(stats, final=True)


def _peek(checkpoint_dir: str) -> TrainState:
    path = Path(checkpoint_dir) / TRAIN_STATE_DIR / STATE_FILE
    if not path.exists():
        raise ValueError(f"{checkpoint_dir}: checkpoint has no {TRAIN_STATE_DIR}/{STATE_FILE}; it cannot be resumed")
    return TrainState.from_json(path.read_text(), source=str(path))
