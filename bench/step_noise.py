"""Why a training step through Ray Train is slower than the same step in plain torch on a
small machine: the step's sensitivity to other processes' CPU time.

    PYTHONPATH=. .venv/bin/python bench/step_noise.py --model demo_out/runs/stage1/model \
        --data demo_out/data --stage 2 --steps 50 --load 0.15,0.3

Each setting is a fresh process that trains ``--steps`` steps of ``--stage`` in plain torch
(the trainer's losses, parameter groups and CPU autocast, AdamW, no Ray, no DeepSpeed) from
``--model`` with ``--threads`` intra-op threads, after 5 warm-up steps, and reports the mean
step (collate, forward, backward, optimizer) over the last ``steps - 10``, once per round
(``--rounds``, the settings interleaved):

* ``main_thread`` / ``second_thread``: the loop in the process's main thread, or in a second
  thread while the main thread has run torch on its own thread team (as a Ray Train worker's
  main thread can). With more OpenMP threads than cores, libgomp stops spinning at barriers and
  every parallel region pays for futex wake-ups;
* ``load_X``: the main-thread loop beside busy-wait processes that together take ``X`` cores
  in 1 ms bursts (``X`` rounded to 0.15-core processes), as a local Ray instance's idle
  processes do (each Python actor wakes every 10 ms; about 0.16 cores in all during a 2-core
  demo's stage 2). Two intra-op threads on two cores wait at every barrier for a thread that
  another process has pre-empted, so the step loses more than the cores taken.

Prints one JSON object; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BURST_S = 0.001  # one busy burst of a load process
LOAD_PER_PROCESS = 0.15  # cores one load process takes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint or preset the loop starts from")
    p.add_argument("--data", type=Path, required=True, help="a `reir synth` directory (its train split)")
    p.add_argument("--stage", default="2", choices=["1", "2"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", default="0.15,0.3", help="cores taken by other processes, comma list")
    p.add_argument("--rounds", type=int, default=2, help="times every setting runs, interleaved")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one setting in this process
    return p.parse_args(argv)


def _loop(args: argparse.Namespace, in_thread: bool) -> float:
    """The mean step of ``args.steps`` plain-torch steps (the first 10 not counted)."""
    import random
    import threading

    import torch

    from reir.data.formats import load_samples
    from reir.model import create_model
    from reir.model.losses import ReirCriterion
    from reir.training.config import TrainConfig
    from reir.training.precision import cpu_autocast_enabled, training_autocast
    from reir.training.trainer import ImageCache, _param_groups, adamw

    torch.set_num_threads(args.threads)
    model, processor = create_model(args.model)
    model.train()
    criterion = ReirCriterion(model.config, stage=args.stage)
    cfg = TrainConfig(data_root=str(args.data), stage=args.stage)
    optimizer = adamw(_param_groups(model, cfg), lr=cfg.lr)
    autocast = cpu_autocast_enabled(cfg.cpu_bf16, "cpu")
    samples, cache, rng = load_samples(args.data, "train"), ImageCache(), random.Random(0)

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            chosen = rng.sample(samples, args.batch_size)
            batch = processor.collate(chosen, [cache.get(s.path) for s in chosen], hflip_prob=0.5, rng=rng,
                                      max_refs_per_image=cfg.max_refs_per_image)
            with training_autocast(autocast):
                losses = criterion(model, batch)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        return times

    run(5)  # warm-up, in the main thread: its thread team now exists
    if not in_thread:
        times = run(args.steps)
    else:
        out: dict[str, list[float]] = {}

        def body() -> None:
            torch.set_num_threads(args.threads)  # as the trainer does in Ray Train's training thread
            out["times"] = run(args.steps)

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        times = out["times"]
    kept = times[10:] or times
    return sum(kept) / len(kept)


def _burn(share: float) -> None:
    """Busy-wait ``share`` of every burst period, sleep the rest (one load process)."""
    period = BURST_S / share
    while True:
        started = time.perf_counter()
        while time.perf_counter() - started < BURST_S:
            pass
        time.sleep(period - BURST_S)


def _setting(args: argparse.Namespace, name: str) -> float:
    """One setting's mean step, in a fresh process (its own thread teams, nothing cached)."""
    cmd = [sys.executable, __file__, "--model", args.model, "--data", str(args.data), "--stage", args.stage,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--one", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.one:
        print(_loop(args, in_thread=args.one == "second_thread"))
        return {}
    # A small machine's speed drifts by 10-30% within minutes: the settings run in interleaved
    # rounds, and each reports one mean step per round.
    result: dict[str, Any] = {"model": args.model, "stage": args.stage, "batch_size": args.batch_size,
                              "threads": args.threads, "steps": args.steps, "step_s": {}}
    loads = [max(0, round(float(v) / LOAD_PER_PROCESS)) for v in args.load.split(",") if v.strip()]
    for _ in range(args.rounds):
        for name in ("main_thread", "second_thread"):
            result["step_s"].setdefault(name, []).append(round(_setting(args, name), 4))
        for procs in loads:
            burners = [multiprocessing.Process(target=_burn, args=(LOAD_PER_PROCESS,), daemon=True) for _ in range(procs)]
            for b in burners:
                b.start()
            try:
                step = round(_setting(args, "main_thread"), 4)
            finally:
                for b in burners:
                    b.kill()
                    b.join()
            result["step_s"].setdefault(f"load_{procs * LOAD_PER_PROCESS:.2f}", []).append(step)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
