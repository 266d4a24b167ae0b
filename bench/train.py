"""Training throughput benchmark: samples/s of Ray Train + DeepSpeed for 1 vs 2 workers and
ZeRO 0 vs 2, on a generated synthetic benchmark, with short fixed step counts.

    PYTHONPATH=. .venv/bin/python bench/train.py --steps 12 --batch-size 8 --out train.json

Every (workers, ZeRO) pair is one real ``reir.training.run_training`` run (Ray Train
TorchTrainer, DeepSpeed on gloo, or NCCL + bf16 with ``--gpu``) of ``--steps`` optimizer steps
from the preset's random init. Reported per run: ``samples_per_s`` over the whole loop and
``steady_samples_per_s`` after the first step (which also pays for the data pipeline's start),
``steady_step_s``, ``wall_s`` of the whole run (Ray Train start, model build, checkpoint) and,
on GPU, ``peak_memory_mb`` of a worker. Prints one JSON object; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run_one(data_root: Path, out_dir: Path, workers: int, zero: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run; its figures come from the stats the trainer stores with the checkpoint."""
    from reir.training.config import TrainConfig
    from reir.training.trainer import run_training

    cfg = TrainConfig(
        data_root=str(data_root), model=args.model, stage=args.stage, output_dir=str(out_dir),
        run_name=f"w{workers}-z{zero}", num_workers=workers, cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.gpu, bf16=True, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=0,
        zero_stage=zero, log_every=10**6, seed=args.seed,
    )  # fmt: skip
    started = time.perf_counter()
    model_dir = run_training(cfg, echo=lambda _: None)
    wall = time.perf_counter() - started
    stats = json.loads((model_dir / "training_args.json").read_text())["stats"]
    keep = ("steps", "seconds", "samples_per_s", "steady_samples_per_s", "steady_step_s", "peak_memory_mb")
    return {"workers": workers, "zero_stage": zero, **{k: round(stats[k], 4) for k in keep if k in stats},
            "wall_s": round(wall, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="preset name or checkpoint directory [small]")
    parser.add_argument("--stage", choices=["1", "2"], default="2", help="2 adds CLIA's all-gather [2]")
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="comma-separated [1,2]")
    parser.add_argument("--zero", type=_ints, default=[0, 2], help="comma-separated ZeRO stages [0,2]")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run [12]")
    parser.add_argument("--batch-size", type=int, default=8, help="images per worker step [8]")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (= torch threads) per worker [1]")
    parser.add_argument("--images", type=int, default=0, help="generated images [enough for every run's steps]")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the steady rate excludes the first step)")

    import ray

    from reir.data.synth import generate

    # One epoch holds every run's steps, so no run pays for a second pass over the data.
    needed = max(args.workers) * args.batch_size * args.steps
    images = args.images or int(needed / 0.9) + 8
    with tempfile.TemporaryDirectory(prefix="reir-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        generate(tmp / "data", num_images=images, test_fraction=0.1, image_size=args.image_size,
                 seed=args.seed, discovery_queries=0)  # fmt: skip
        started_ray = not ray.is_initialized()
        if started_ray:
            cpus = max(args.workers) * args.cpus_per_worker + 2  # + room for Ray Data's tasks
            ray.init(num_cpus=int(cpus + 0.999), num_gpus=max(args.workers) if args.gpu else 0,
                     include_dashboard=False, log_to_driver=False)  # fmt: skip
        load_before = os.getloadavg()[0]
        try:
            runs = [run_one(tmp / "data", tmp / "runs", w, z, args) for w in args.workers for z in args.zero]
        finally:
            if started_ray:
                ray.shutdown()
        load_after = os.getloadavg()[0]
    result = {
        "runs": runs,
        "model": args.model,
        "stage": args.stage,
        "batch_size_per_worker": args.batch_size,
        "steps": args.steps,
        "cpus_per_worker": args.cpus_per_worker,
        "device": "cuda (bf16)" if args.gpu else "cpu (fp32, gloo)",
        "images": images,
        "image_size": args.image_size,
        "machine_cpus": os.cpu_count(),
        "load_avg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
