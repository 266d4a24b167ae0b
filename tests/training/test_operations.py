"""Training operations on real Ray Train + DeepSpeed (gloo, CPU): a killed worker, resume
from storage (a ``file://`` URI), and evaluation during training."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reir.training.config import TrainConfig
from reir.training.operations import StepInfo


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reir.data.synth import generate

    root = tmp_path_factory.mktemp("ops") / "data"
    generate(root, num_images=20, test_fraction=0.3, image_size=64, seed=11, discovery_queries=0)
    return root


def _config(data: Path, out: str, **overrides: object) -> TrainConfig:
    fields: dict[str, object] = {"data_root": str(data), "model": "tiny", "output_dir": out, "batch_size": 2,
                                 "max_steps": 4, "warmup_steps": 1, "log_every": 1, "text_lr_mult": 0.5}
    return TrainConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def _recorder(
    log: Path, *, kill_rank: int | None = None, kill_step: int = 0, registered: Path | None = None,
) -> Callable[[StepInfo], None]:
    """A step hook that appends every step to ``log`` and, on the first attempt only, makes
    worker ``kill_rank`` SIGKILL itself after step ``kill_step``, once Ray has registered a
    checkpoint (``registered``, its checkpoint-manager snapshot, exists: the controller
    collects reports on its health-check poll, and a worker that dies first takes its
    report with it). Defined in a function so that cloudpickle ships it by value."""
    path = str(log)

    def hook(info: StepInfo) -> None:
        import builtins

        with open(path, "a") as f:
            # Ray Train's print patch (off in reir's runs) replaces builtins.print with its own function
            f.write(json.dumps({"step": info.step, "rank": info.rank, "resumed_from": info.resumed_from,
                                "print": builtins.print.__module__ or "builtins",
                                "env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "RAY_API_SERVER_ADDRESS")}})
                    + "\n")
        if info.rank == kill_rank and info.step == kill_step and info.resumed_from is None:
            deadline = time.monotonic() + 60
            while registered is not None and not registered.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _steps(log: Path) -> list[dict[str, int | None]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_session: None, data: Path, tmp_path: Path) -> None:
    """Two ZeRO-3 workers, a checkpoint and a held-out evaluation every 2 steps; worker 1
    dies after step 3. The restarted group continues at step 2's checkpoint (weights,
    optimizer, history) and the run ends at step 5 with its curves."""
    from reir.model import create_model
    from reir.training.trainer import run_training

    log = tmp_path / "steps.jsonl"
    cfg = _config(data, str(tmp_path / "runs"), run_name="killed", num_workers=2, zero_stage=3, max_steps=5,
                  checkpoint_every=2, max_failures=1, eval_every=2, eval_max_queries=8, eval_max_images=6)
    snapshot = tmp_path / "runs" / "ray" / "killed" / "checkpoint_manager_snapshot.json"
    model_dir = Path(run_training(cfg, step_hook=_recorder(log, kill_rank=1, kill_step=3, registered=snapshot)))
    seen = _steps(log)
    first = [s for s in seen if s["resumed_from"] is None]
    again = [s for s in seen if s["resumed_from"] is not None]
    assert {s["step"] for s in first if s["rank"] == 1} == {1, 2, 3}  # rank 1 died after step 3
    assert again and {s["resumed_from"] for s in again} == {2}  # the step-2 checkpoint, not step 0
    assert sorted(s["step"] for s in again if s["rank"] == 0) == [3, 4, 5]
    args = json.loads((model_dir / "training_args.json").read_text())
    assert args["stats"]["steps"] == 5 and args["stats"]["world_size"] == 2
    assert not (model_dir / "train_state").exists()  # optimizer state stays in the run's storage
    model, _ = create_model(str(model_dir))  # ZeRO-3 slices were gathered into one full model
    assert sum(p.numel() for p in model.parameters()) > 0
    # The history survived the restart: steps 1-2 from the first attempt, 3-5 from the second.
    history = json.loads((model_dir / "metrics_history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in history["eval"]] == [2, 4, 5]  # on schedule, and at the end
    for record in history["eval"]:
        assert {"eval_BR@1@0.5", "eval_BR@10@0.5", "eval_REC_Acc@0.5"} <= set(record)
        assert all(0.0 <= v <= 1.0 for k, v in record.items() if k != "step")
    assert args["stats"]["eval_BR@1@0.5"] == history["eval"][-1]["eval_BR@1@0.5"]  # reported with the checkpoint
    png = (model_dir / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_resume_continues_a_run_in_uri_storage(ray_session: None, data: Path, tmp_path: Path) -> None:
    from reir.training.checkpointing import latest_checkpoint, read_state
    from reir.training.trainer import run_training, worker_env_vars

    uri = (tmp_path / "store").as_uri()  # file:// - through pyarrow.fs, as s3:// or gs:// would be
    with pytest.raises(ValueError, match="has no checkpoint under"):
        run_training(_config(data, uri, run_name="r", resume=True))
    first = run_training(_config(data, uri, run_name="r", max_steps=2))
    assert isinstance(first, str) and first == f"{uri}/r/model"
    log = tmp_path / "resumed.jsonl"
    resumed = run_training(_config(data, uri, run_name="r", max_steps=4, resume=True), step_hook=_recorder(log))
    assert [(s["step"], s["resumed_from"]) for s in _steps(log)] == [(3, 2), (4, 2)]
    # printed progress reaches the driver once: Ray Train's print patch is off in the workers
    assert {s["print"] for s in _steps(log)} == {"builtins"}
    # the workers start with the OpenMP spin count and keep the job's environment beside it
    assert {s["env"]["GOMP_SPINCOUNT"] for s in _steps(log)} == {worker_env_vars(use_gpu=False).get("GOMP_SPINCOUNT")}
    assert all(s["env"]["RAY_API_SERVER_ADDRESS"] for s in _steps(log))
    stats = json.loads((tmp_path / "store" / "r" / "model" / "training_args.json").read_text())["stats"]
    assert resumed == first and stats["steps"] == 4
    latest = latest_checkpoint(f"{uri}/ray/r")
    assert latest is not None and read_state(latest).step == 4
    with pytest.raises(ValueError, match="written by 1 workers"):
        run_training(_config(data, uri, run_name="r", resume=True, num_workers=2))


def _saved_run(root: Path, *, step: int, fit_id: str, world_size: int = 1) -> str:
    from reir.training.checkpointing import TrainState

    (root / "train_state").mkdir(parents=True)
    (root / "train_state" / "trainer.json").write_text(TrainState(step=step, fit_id=fit_id,
                                                                  world_size=world_size).to_json())
    return str(root)


def test_a_new_run_under_an_old_name_starts_at_step_zero(tmp_path: Path) -> None:
    """Ray hands a run's latest checkpoint to any later fit() of the same name; only a
    restart of the same fit, or --resume, continues from it."""
    import random

    from reir.training.operations import TrainOps

    def ops(cfg: TrainConfig, world: int = 1) -> TrainOps:  # the engine is only touched to restore
        return TrainOps(cfg=cfg, engine=None, processor=None, rank=0, world=world, rng=random.Random(0), fit_id="new")

    old = _saved_run(tmp_path / "old", step=4, fit_id="old")
    fresh = ops(_config(tmp_path, "runs"))
    assert fresh.start(old).step == 0 and fresh.resumed_from is None
    with pytest.raises(ValueError, match="written by 1 workers, this run has 2"):
        ops(_config(tmp_path, "runs", resume=True), world=2).start(old)
    with pytest.raises(ValueError, match="cannot be resumed"):
        ops(_config(tmp_path, "runs", resume=True)).start(str(tmp_path))


def test_run_training_outside_a_ray_session_ignores_a_dead_cluster_recorded_by_ray(data: Path, tmp_path: Path) -> None:
    """A library caller without ray.init: Ray's own address file names a cluster that is gone
    (a Ray instance killed before it cleaned up). run_training starts its own local instance
    instead of waiting on the dead address for ever (its own process, its own Ray temp dir;
    before, the run waited on the dead address until the timeout)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (temp / "ray").mkdir(parents=True)
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
    script = ("from reir.training.config import TrainConfig; from reir.training.trainer import run_training; "
              f"cfg = TrainConfig(data_root={str(data)!r}, model='tiny', output_dir={str(tmp_path / 'runs')!r}, "
              "batch_size=2, max_steps=1, warmup_steps=0, run_name='fresh', num_workers=1); "
              "print('MODEL', run_training(cfg))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", script], check=False, env={**env, "RAY_TMPDIR": str(temp)},
                              capture_output=True, text=True, timeout=240)  # fmt: skip
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MODEL" in done.stdout and (tmp_path / "runs" / "fresh" / "model" / "config.json").is_file()


def test_workers_spin_longer_between_cpu_ops_unless_told_otherwise() -> None:
    from reir.training.trainer import CPU_OMP_SPINCOUNT, worker_env_vars

    assert worker_env_vars(use_gpu=False, environ={}) == {"GOMP_SPINCOUNT": CPU_OMP_SPINCOUNT}
    assert worker_env_vars(use_gpu=True, environ={}) == {}  # GPU kernels do not wait on OpenMP
    # the driver's own choice reaches the workers, whichever device
    assert worker_env_vars(use_gpu=False, environ={"OMP_WAIT_POLICY": "passive"}) == {"OMP_WAIT_POLICY": "passive"}
    assert worker_env_vars(use_gpu=True, environ={"GOMP_SPINCOUNT": "0", "PATH": "/bin"}) == {"GOMP_SPINCOUNT": "0"}
