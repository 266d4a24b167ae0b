"""Resumable checkpoints of a training run, in the run's storage (a local directory or a
URI that ``pyarrow.fs`` understands).

A checkpoint is one directory; Ray Train merges every worker's upload into it:

- the model directory that ``reir.model.create_model`` loads (``config.json``,
  ``model.safetensors``, the processor files, ``training_args.json``; written by rank 0);
- ``train_state/trainer.json``: step, epoch position, elapsed time, world size, the id of
  the ``fit()`` that wrote it and the metric history (rank 0);
- ``train_state/deepspeed/``: DeepSpeed's engine state, i.e. weights and optimizer state
  (with ZeRO every rank writes its own shard of the optimizer, ZeRO 3 also of the weights);
- ``train_state/rng_rank{r}.pt``: each rank's random generators (augmentation order).

The exported model (``{output_dir}/{run_name}/model``) is the checkpoint without
``train_state/``.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAIN_STATE_DIR = "train_state"
STATE_FILE = "trainer.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names checkpoint directories checkpoint_<timestamp>


@dataclass
class TrainState:
    """Where a run stands; everything a restarted worker needs beyond DeepSpeed's state."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of ``epoch`` already trained on (skipped on resume)
    elapsed_s: float = 0.0  # training time so far: the time budget spans restarts
    world_size: int = 1
    stage: str = "1"
    fit_id: str = ""  # which run_training call wrote it: tells a restart from a stale run
    history: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"train": [], "eval": []})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> TrainState:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a reir trainer state ({e})") from e


def is_uri(location: str) -> bool:
    return "://" in location


def join(location: str, *parts: str) -> str:
    """Path join that keeps a URI a URI (``s3://b/runs`` + ``x`` -> ``s3://b/runs/x``)."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def filesystem(location: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path on it)`` for a local path or a URI."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def latest_checkpoint(experiment_dir: str) -> str | None:
    """The newest complete checkpoint of a run (Ray names them by timestamp, so the name
    orders them); one without a trainer state (a worker died mid-upload) does not count."""
    import pyarrow.fs

    fs, path = filesystem(experiment_dir)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return None
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)  # fmt: skip
    for name in names:
        state = f"{path}/{name}/{TRAIN_STATE_DIR}/{STATE_FILE}"
        if fs.get_file_info(state).type == pyarrow.fs.FileType.File:
            return join(experiment_dir, name)
    return None


def check_resumable(cfg: Any, experiment_dir: str) -> str:
    """The checkpoint ``cfg.resume`` will continue from; a clear error when there is none or
    it cannot be continued with ``cfg`` (checked before any worker starts)."""
    latest = latest_checkpoint(experiment_dir)
    if latest is None:
        raise ValueError(f"resume: run {cfg.run_name!r} has no checkpoint under {experiment_dir} "
                         "(check output_dir and run_name)")
    state = read_state(latest)
    if state.stage != cfg.stage:
        raise ValueError(f"resume: {latest} is a stage {state.stage} checkpoint, this run is stage {cfg.stage}")
    if state.world_size != cfg.num_workers:
        raise ValueError(f"resume: {latest} was written by {state.world_size} workers, num_workers is "
                         f"{cfg.num_workers}: ZeRO shards the optimizer state per worker, use the same count")
    return latest


def read_state(checkpoint_dir: str) -> TrainState:
    fs, path = filesystem(checkpoint_dir)
    source = f"{checkpoint_dir}/{TRAIN_STATE_DIR}/{STATE_FILE}"
    with fs.open_input_stream(f"{path}/{TRAIN_STATE_DIR}/{STATE_FILE}") as f:
        return TrainState.from_json(f.read().decode(), source=source)


def export_model(checkpoint_fs: Any, checkpoint_path: str, destination: str) -> None:
    """Copy a checkpoint's model directory (everything but ``train_state/``) to
    ``destination``, replacing what was there."""
    import pyarrow.fs

    dst_fs, dst = filesystem(destination)
    if dst_fs.get_file_info(dst).type != pyarrow.fs.FileType.NotFound:
        dst_fs.delete_dir(dst)
    dst_fs.create_dir(dst, recursive=True)
    for info in checkpoint_fs.get_file_info(pyarrow.fs.FileSelector(checkpoint_path, recursive=True)):
        rel = info.path[len(checkpoint_path.rstrip("/")) + 1 :]
        if info.type != pyarrow.fs.FileType.File or rel.split("/")[0] == TRAIN_STATE_DIR:
            continue
        dst_fs.create_dir(f"{dst}/{rel}".rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(info.path, f"{dst}/{rel}", source_filesystem=checkpoint_fs, destination_filesystem=dst_fs)


@contextmanager
def local_copy(directory: str, filename: str) -> Iterator[Path]:
    """A local directory holding ``directory/filename`` to edit in place; for a URI, a
    temporary copy that is uploaded back afterwards."""
    if not is_uri(directory):
        yield Path(directory)
        return
    import pyarrow.fs

    fs, path = filesystem(directory)
    with tempfile.TemporaryDirectory(prefix="reir-edit-") as tmp:
        local = Path(tmp) / filename
        if fs.get_file_info(f"{path}/{filename}").type == pyarrow.fs.FileType.File:
            pyarrow.fs.copy_files(f"{path}/{filename}", str(local), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield Path(tmp)
        if local.exists():
            pyarrow.fs.copy_files(str(local), f"{path}/{filename}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)


class FullWeights:
    """Rank 0's view of the whole model, for saving and evaluating.

    With ZeRO 0-2 every rank holds all weights: the engine's own module. With ZeRO 3 each
    rank holds a slice; ``get`` gathers them (a collective: every rank must call it) into
    a plain copy that rank 0 keeps between calls."""

    def __init__(self, engine: Any, *, zero_stage: int, rank: int) -> None:
        self.engine, self.zero_stage, self.rank = engine, zero_stage, rank
        self._copy: torch.nn.Module | None = None

    def get(self) -> Any:
        module = self.engine.module
        if self.zero_stage < 3:
            return module if self.rank == 0 else None
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            # One parameter at a time: never more than one full tensor beyond the slices.
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=hasattr(tensor, "ds_id")):
                if self.rank == 0:
                    state[name] = tensor.detach().to("cpu", copy=True)
        if self.rank != 0:
            return None
        if self._copy is None:
            self._copy = type(module)(module.config, load_towers=False)
        self._copy.load_state_dict(state, strict=True)
        return self._copy.to(module.device if hasattr(module, "device") else "cpu")


def write_checkpoint(
    engine: Any, model: Any, processor: Any, state: TrainState, files: dict[str, Any], *, rank: int,
    rng: random.Random,
) -> str:
    """Write this rank's part of a checkpoint into a new local directory; returns it.

    Collective: every rank must call it (DeepSpeed's save synchronizes them). ``model`` is
    rank 0's :class:`FullWeights` (``None`` elsewhere); ``files`` are JSON files rank 0
    adds to the model directory."""
    out = Path(tempfile.mkdtemp(prefix="reir-ckpt-"))
    train_dir = out / TRAIN_STATE_DIR
    engine.save_checkpoint(str(train_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": rng.getstate()},
               train_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        model.save_pretrained(out)
        processor.save_pretrained(out)
        for name, content in files.items():
            (out / name).write_text(json.dumps(content, indent=2, default=str))
        (train_dir / STATE_FILE).write_text(state.to_json())
    return str(out)


def restore_checkpoint(engine: Any, checkpoint_dir: str, *, rank: int, rng: random.Random) -> TrainState:
    """Load weights, optimizer state and this rank's random generators; returns the state.
    Collective (DeepSpeed's load): every rank must call it."""
    root = Path(checkpoint_dir)
    state = TrainState.from_json((root / TRAIN_STATE_DIR / STATE_FILE).read_text(), source=str(root))
    load_path, _ = engine.load_checkpoint(
        str(root / TRAIN_STATE_DIR / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
        load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True,
    )  # fmt: skip
    if load_path is None:
        raise ValueError(f"{root / TRAIN_STATE_DIR / DEEPSPEED_DIR}: no DeepSpeed state to resume from")
    rng_file = root / TRAIN_STATE_DIR / f"rng_rank{rank}.pt"
    if rng_file.exists():
        saved = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(saved["torch"])
        np.random.set_state(saved["numpy"])
        rng.setstate(saved["python"])
    return state
