"""Quality benchmark: reir against a trained two-stage system and an exhaustive re-rank scan (and a
weak-mode checkpoint) on one test gallery; BR@1/5/10 at IoU 0.5 and milliseconds per query, and
the cost per query again on a gallery replicated to ``--scale-images``.

    reir train --stage image-retrieval --model demo_out/runs/rerank/model --data demo_out/data \
        --minutes 3.5 --batch-size 64 --lr 2e-3 --cpus-per-worker 2 --out runs --name image-retrieval
    PYTHONPATH=. .venv/bin/python bench/quality.py --model demo_out/runs/rerank/model \
        --two-stage-model runs/image-retrieval/model --data demo_out/data --threads 1 \
        --scale-images 10000 --out quality.json

Systems (``reir.evaluation.comparison``, ``reir.evaluation.baselines``), all over the same
instance rows of every test image, encoded once by ingestion's encoder, all grounding with the
same re-ranker: ``reir`` (milvus-lite ANN top 100 + the re-ranker on the images of the top 50,
the Serve app's query path in process), ``reir_ann`` (the same without the re-ranker),
``two_stage`` (an image-level retriever trained on the same data, one vector per image, then
the re-ranker's box in each of the top images, in retrieval order), ``two_stage_rescored``
(the top 50 retrieved images ordered by the re-ranker), ``rerank_scan`` (the re-ranker on every
gallery image: the exact upper bound of reir's pool), ``weak`` (reir with ``--weak-model``;
null without). Writes ``{"reir": {"BR@1@0.5": ..., "BR@5@0.5": ..., "BR@10@0.5": ...,
"seconds_per_query": ..., "num_queries": ..., "slices": ...}, ..., "weak": ..., "setup": ...,
"scale": ...}`` and prints markdown tables.
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
    parser.add_argument("--two-stage-model", type=Path, default=None,
                        help="checkpoint with an image-level retrieval head (reir train --stage image-retrieval) "
                             "[--model when it has one; else no two-stage rows]")
    parser.add_argument("--scale-images", type=int, default=0,
                        help="also time every system on the gallery replicated to about this many images [off]")
    parser.add_argument("--scale-queries", type=int, default=30, help="queries timed on that gallery [30]")
    parser.add_argument("--max-queries", type=int, default=None, help="a seeded sample of the test queries [all]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k-instances", type=int, default=None,
                        help="instances stored per image at most [the checkpoint's policy, as `reir ingest`]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every system [1]")
    parser.add_argument("--pools", default="",
                        help="also reir with these re-rank pools, comma-separated (ServeConfig.rerank_candidates and "
                             "candidates): systems reir_pool{P} [none]")
    parser.add_argument("--ann-min-rows", type=int, default=None,
                        help="ServeConfig.memory_index_ann_min_rows of every reir system [serving's default]")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the milvus-lite files go [a temp dir]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model = _checkpoint(parser, args.model, "--model")
    weak = _checkpoint(parser, args.weak_model, "--weak-model")
    two_stage = _checkpoint(parser, args.two_stage_model, "--two-stage-model")
    if not (args.data / "reircoco.json").is_file():
        parser.error(f"--data {args.data}: no reircoco.json (expected a `reir synth --out` directory)")
    if args.max_queries is not None and args.max_queries < 1:
        parser.error("--max-queries must be >= 1")
    try:
        pools = tuple(int(p) for p in args.pools.split(",") if p.strip())
    except ValueError:
        parser.error(f"--pools {args.pools!r}: comma-separated whole numbers")
    if any(not 1 <= p <= 1000 for p in pools):
        parser.error("--pools: each pool between 1 and 1000 (ServeConfig.rerank_candidates)")
    if args.ann_min_rows is not None and args.ann_min_rows < 0:
        parser.error("--ann-min-rows must be >= 0")

    import torch

    from reir.evaluation.comparison import QualityConfig, run_comparison

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="reir-quality-") as tmp:
        cfg = QualityConfig(data_root=args.data, model_dir=model, work_dir=args.work_dir or Path(tmp),  # type: ignore[arg-type]
                            weak_model_dir=weak, two_stage_model_dir=two_stage, max_queries=args.max_queries,
                            seed=args.seed, top_k_instances=args.top_k_instances, threads=args.threads,
                            scale_images=args.scale_images, scale_queries=args.scale_queries, pools=pools,
                            ann_min_rows=args.ann_min_rows)  # fmt: skip
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
