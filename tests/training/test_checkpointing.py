"""Every ZeRO stage takes a step on CPU, and its checkpoint brings a fresh engine to the
same place: weights, optimizer state and random generators (one process, gloo)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from reir.training.checkpointing import (
    FullWeights,
    TrainState,
    export_model,
    latest_checkpoint,
    read_state,
    restore_checkpoint,
    write_checkpoint,
)
from reir.training.config import TrainConfig


@pytest.fixture(scope="module")
def single_process_group() -> Iterator[None]:
    """A world of one: DeepSpeed needs a process group even for ZeRO on one rank."""
    import os

    import torch.distributed as dist

    from reir.training.trainer import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    init_distributed(use_gpu=False)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Exact resume is checked to 1e-6, so the kernels must be deterministic: with two torch
    threads this module run alone failed 4 of 5 here (the weights after the next step differed);
    with one it passes. What is tested is the checkpoint, not multi-threaded CPU numerics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reir.data.synth import generate

    root = tmp_path_factory.mktemp("ckpt") / "data"
    generate(root, num_images=8, test_fraction=0.25, image_size=64, seed=4, discovery_queries=0)
    return root


def _engine(cfg: TrainConfig, seed: int) -> tuple[Any, Any, Any]:
    from reir.training.trainer import _build_engine

    torch.manual_seed(seed)
    return _build_engine(cfg, 0, 1, torch.device("cpu"))


def _step(engine: Any, criterion: Any, batch: Any) -> float:
    torch.manual_seed(7)  # same randomness (matching ties, etc.) for both engines
    losses = criterion(engine.module, batch)
    engine.backward(losses["loss"])
    engine.step()
    return float(losses["loss"].detach())


def _weights(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    model = FullWeights(engine, zero_stage=zero_stage, rank=0).get()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_each_zero_stage_steps_and_resumes_exactly(
    zero_stage: int, single_process_group: None, batch_source: Path, tmp_path: Path,
) -> None:
    from reir.data.formats import load_samples
    from reir.model import create_model

    cfg = TrainConfig(data_root=str(batch_source), model="tiny", zero_stage=zero_stage, batch_size=2,
                      text_lr_mult=0.5, lr=1e-3)
    engine, processor, criterion = _engine(cfg, seed=0)
    samples = load_samples(batch_source, "train")[:2]
    batch = processor.collate(samples, [Image.open(s.path).convert("RGB") for s in samples])
    initial = _weights(engine, zero_stage)
    _step(engine, criterion, batch)
    trained = _weights(engine, zero_stage)
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)  # the step changed the weights
    ckpt = Path(write_checkpoint(engine, FullWeights(engine, zero_stage=zero_stage, rank=0).get(), processor,
                                 TrainState(step=1, epoch=0, micro_in_epoch=1, stage="1", fit_id="f"), {},
                                 rank=0, rng=random.Random(1)))  # fmt: skip
    fresh, _, _ = _engine(cfg, seed=99)  # other initial weights, empty optimizer state
    rng = random.Random(2)
    state = restore_checkpoint(fresh, str(ckpt), rank=0, rng=rng)
    assert (state.step, state.micro_in_epoch, state.fit_id) == (1, 1, "f")
    assert rng.random() == random.Random(1).random()  # this rank's generator came back
    restored = _weights(fresh, zero_stage)
    assert all(torch.equal(trained[k], restored[k]) for k in trained)
    # The next step matches only if the optimizer's moments came back too.
    assert _step(fresh, criterion, batch) == pytest.approx(_step(engine, criterion, batch), rel=1e-5)
    after, after_fresh = _weights(engine, zero_stage), _weights(fresh, zero_stage)
    assert all(torch.allclose(after[k], after_fresh[k], atol=1e-6) for k in after)
    # The model directory inside the checkpoint is what create_model loads: the full weights.
    exported = tmp_path / "model"
    import pyarrow.fs

    export_model(pyarrow.fs.LocalFileSystem(), str(ckpt), str(exported))
    assert not (exported / "train_state").exists()
    loaded, _ = create_model(str(exported))
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())


def test_latest_checkpoint_skips_incomplete_ones(tmp_path: Path) -> None:
    run = tmp_path / "ray" / "run"
    for name, step in [("checkpoint_2026-01-01_00-00-01.000001", 2), ("checkpoint_2026-01-01_00-00-02.000001", 4)]:
        (run / name / "train_state").mkdir(parents=True)
        (run / name / "train_state" / "trainer.json").write_text(TrainState(step=step).to_json())
    (run / "checkpoint_2026-01-01_00-00-03.000001").mkdir()  # a worker died mid-upload: no trainer state
    latest = latest_checkpoint(str(run))
    assert latest is not None and read_state(latest).step == 4
    assert latest_checkpoint(run.as_uri()) == run.as_uri() + "/checkpoint_2026-01-01_00-00-02.000001"
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    (run / "checkpoint_2026-01-01_00-00-02.000001" / "train_state" / "trainer.json").write_text("{\"step\": ")
    with pytest.raises(ValueError, match="trainer.json: not a reir trainer state"):
        read_state(latest)
