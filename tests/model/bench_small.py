"""Manual benchmark (not collected by pytest): throughput and learning of a preset on CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.model.bench_small --preset small --steps 600
"""

from __future__ import annotations

import argparse
import time

import torch

from reir.model import ReirCriterion, create_model

from .synthetic import make_dataset
from .train_utils import evaluate, train


def throughput(preset: str, batch_size: int, iters: int) -> float:
    """Forward+backward (train mode, stage-2 criterion) images/s."""
    model, proc = create_model(preset)
    size = proc.image_size
    data = make_dataset(0, batch_size, width=size + size // 4, height=size)
    batch = proc.collate([s for _, s in data], [im for im, _ in data])
    criterion = ReirCriterion(model.config, stage="2")
    model.train()
    for i in range(iters + 2):
        if i == 2:  # warm-up iterations excluded
            t0 = time.perf_counter()
        loss = criterion(model, batch)["loss"]
        model.zero_grad(set_to_none=True)
        loss.backward()
    return batch_size * iters / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--stage", default="1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--relational", action="store_true", help="twins that need position/size/relations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.skip_throughput:
        ips = throughput(args.preset, args.batch_size, iters=5)
        print(f"{args.preset}: forward+backward {ips:.1f} images/s at batch {args.batch_size}", flush=True)
    model, proc = create_model(args.preset)
    size = proc.image_size
    kw = {"width": size + size // 4, "height": size}
    train_data = make_dataset(0, 2000, relational=args.relational, **kw)
    test_data = make_dataset(1, 200, start=100000, relational=args.relational, **kw)
    t0 = time.perf_counter()

    def report(step: int) -> None:
        res = evaluate(model, proc, test_data)
        print(f"step {step} ({(time.perf_counter() - t0) / 60:.1f} min): {res}", flush=True)

    train(model, proc, train_data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          stage=args.stage, log_every=50, eval_every=args.eval_every, on_eval=report)  # fmt: skip


if __name__ == "__main__":
    main()
