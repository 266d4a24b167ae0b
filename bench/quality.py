"""Quality benchmark: reir against a two-stage baseline and an exhaustive REC scan (and a
weak-mode checkpoint) on one test gallery; BR@1/5/10 at IoU 0.5 and seconds per query.

    PYTHONPATH=. .venv/bin/python bench/quality.py --model demo_out/runs/rerank/model \
        --data demo_out/data --max-queries 200 --out quality.json

Systems (``reir.evaluation.comparison``, ``reir.evaluation.baselines``), all over the same
instance rows of every test image, encoded once by ingestion's encoder:
``reir`` (milvus-lite ANN + re-ranker, the Serve app's query path in process), ``reir_ann``
(the same without the re-ranker), ``two_stage`` (image retrieval by the mean of an image's
instance embeddings, then the model's REC box in each retrieved image), ``rec_scan`` (REC on
every gallery image, ranked by REC score), ``weak`` (reir with ``--weak-model``; null without).
Writes ``{"reir": {"BR@1@0.5": ..., "BR@5@0.5": ..., "BR@10@0.5": ..., "seconds_per_query": ...,
"num_queries": ...}, "reir_ann": ..., "two_stage": ..., "rec_scan": ..., "weak": ..., "setup": ...}``
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def _checkpoint(parser: argparse.ArgumentParser, path: Path | None, flag: str) -> Path | None:
    if path is not None and not (path / "config.json").is_file():
        parser.error(f"{flag} {path}: not a checkpoint directory (no config.json)")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="reir checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="benchmark root (reir synth --out)")
    parser.add_argument("--weak-model", type=Path, default=None, help="weak-mode checkpoint directory")
    parser.add_argument("--max-queries", type=int, default=None, help="a seeded sample of the test queries [all]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k-instances", type=int, default=10, help="instances stored per image [10]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the milvus-lite files go [a temp dir]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model = _checkpoint(parser, args.model, "--model")
    weak = _checkpoint(parser, args.weak_model, "--weak-model")
    if not (args.data / "reircoco.json").is_file():
        parser.error(f"--data {args.data}: no reircoco.json (expected a `reir synth --out` directory)")
    if args.max_queries is not None and args.max_queries < 1:
        parser.error("--max-queries must be >= 1")

    import torch

    from reir.evaluation.comparison import QualityConfig, run_comparison

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="reir-quality-") as tmp:
        cfg = QualityConfig(data_root=args.data, model_dir=model, work_dir=args.work_dir or Path(tmp),  # type: ignore[arg-type]
                            weak_model_dir=weak, max_queries=args.max_queries, seed=args.seed,
                            top_k_instances=args.top_k_instances)  # fmt: skip
        load_before = os.getloadavg()[0]
        result = run_comparison(cfg, echo=print)
    # Other jobs on the machine move seconds_per_query; keep the load next to the figures.
    result["setup"]["load_avg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
