"""Discovery mode on the benchmark's discovery queries: precision/recall curve + PNG.

    python bench/discovery.py --data DATA --model CKPT --milvus MILVUS --out discovery.json --png discovery.png

Every discovery query of ``DATA/discovery.json`` (multi-positive ground truth, some with no
match at all) goes once through the in-process query path in ``mode="discover"``
(:func:`reir.serving.pipeline.local_pipeline`: encode, ANN, re-rank, presence) with the
threshold at 0, so every candidate image comes back with its best box and probability;
:mod:`reir.evaluation.discovery` then scores them at every threshold (the curve) and at the
checkpoint's calibrated one (``calibration.json``, what the service uses). ``MILVUS``: a
milvus-lite ``.db`` file, an ``http://`` URI or a milvus-lite server data dir (served here;
pass a copy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localize import milvus_uri  # bench/ helper: serve a milvus-lite data dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark directory (discovery.json)")
    p.add_argument("--model", type=Path, required=True, help="the checkpoint that indexed the gallery")
    p.add_argument("--milvus", required=True, help="a .db file, an http:// URI or a milvus-lite server data dir")
    p.add_argument("--collection", default="reir_live")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None, help="precision/recall curve")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from reir.data.formats import load_discovery
    from reir.evaluation.discovery import Found, discovery_curve, discovery_scores, plot_curve, summarize
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.pipeline import QueryRequest, local_pipeline
    from reir.serving.rerank import discover_threshold_for

    torch.set_num_threads(max(1, args.threads))
    queries = [q for q in load_discovery(args.data) if q.split == "test"]
    if not queries:
        raise SystemExit(f"error: no test discovery queries in {args.data}")
    started = time.perf_counter()
    with milvus_uri(args.milvus) as uri:
        cfg = ServeConfig(model_path=str(args.model), milvus=MilvusConfig(uri=uri, collection=args.collection))
        calibrated = discover_threshold_for(args.model, cfg.discover_threshold)  # what the service uses
        pipeline = local_pipeline(cfg, discover_threshold=0.0)
        try:
            answers = {}
            for q in queries:
                outcome = asyncio.run(pipeline.run(QueryRequest(query=q.raw, mode="discover")))
                answers[q.query_id] = [Found(r.image_id, tuple(r.box), r.score) for r in outcome.results]
        finally:
            pipeline.stages.store.close()  # type: ignore[attr-defined]
    seconds = time.perf_counter() - started
    curve = discovery_curve(answers, queries)
    at = discovery_scores(answers, queries, calibrated)
    result = summarize(curve, at, queries)
    result.update({"seconds_per_query": seconds / len(queries), "model": str(args.model), "data": str(args.data)})
    if args.png is not None:
        plot_curve(curve, at, args.png, title=f"discovery, {len(queries)} queries ({result['empty_queries']} empty)")
        result["png"] = str(args.png)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2, sort_keys=True))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
