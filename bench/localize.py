"""Small-object BR@k with and without the localize stage's zoom, on an indexed benchmark.

    python bench/localize.py --data DATA --model CKPT --milvus MILVUS --out bench_localize.json

``DATA`` is a synthetic benchmark dir (``reircoco.json`` + images), ``CKPT`` the checkpoint
that indexed it, ``MILVUS`` the index: a milvus-lite ``.db`` file, an ``http://`` URI, or a
milvus-lite server data directory (served here with EmbeddedMilvus, which writes into it:
pass a copy). Every test query whose ground-truth box covers less than
``--small-area-fraction`` of its image goes through the in-process query path
(:func:`reir.serving.pipeline.local_pipeline`: encode, ANN, re-rank) once; its top ``--top-k``
answers are then scored as stored and after the localize stage's refiner
(:class:`reir.serving.localize.Localizer`, the same code the service runs). Prints one JSON
object (and writes it to ``--out``): ``BR@k@tau`` (stored boxes), ``zoom_BR@k@tau``, how many
answers were refined, the refiner's latency per query, and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark directory (reircoco.json)")
    p.add_argument("--model", type=Path, required=True, help="the checkpoint that indexed the gallery")
    p.add_argument("--milvus", required=True, help="a .db file, an http:// URI or a milvus-lite server data dir")
    p.add_argument("--collection", default="reir_instances")
    p.add_argument("--split", default="test")
    p.add_argument("--small-area-fraction", type=float, default=0.02)
    p.add_argument("--zoom-factor", type=float, default=3.0)
    p.add_argument("--zoom-steps", type=int, default=3)
    p.add_argument("--min-prior-iou", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=10, help="answers per query, all of them refined")
    p.add_argument("--limit", type=int, default=None, help="at most this many small-object queries")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


@contextlib.contextmanager
def milvus_uri(spec: str) -> Any:
    path = Path(spec)
    if "://" in spec or spec.endswith(".db") or not path.is_dir():
        yield spec
        return
    from reir.platform.milvus_server import EmbeddedMilvus

    with EmbeddedMilvus(path) as server:
        yield server.uri


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from reir.data.formats import test_queries
    from reir.evaluation.localize import Answer, small_object_queries, zoom_box_recall
    from reir.platform.config import LocalizeConfig, MilvusConfig, ServeConfig
    from reir.platform.modeling import load_reir_model
    from reir.serving.localize import Localizer
    from reir.serving.pipeline import QueryRequest, local_pipeline

    torch.set_num_threads(max(1, args.threads))
    queries = small_object_queries(test_queries(args.data, args.split), args.small_area_fraction)
    all_queries = len(test_queries(args.data, args.split))
    if args.limit is not None:
        queries = queries[: args.limit]
    model, processor = load_reir_model(str(args.model))
    localize_cfg = LocalizeConfig(enabled=True, small_area_fraction=args.small_area_fraction,
                                  zoom_factor=args.zoom_factor, zoom_steps=args.zoom_steps,
                                  min_prior_iou=args.min_prior_iou, max_results=args.top_k)
    localizer = Localizer.from_config(model, processor, localize_cfg)
    refine_s: list[float] = []

    def refine(text: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> Any:
        start = time.perf_counter()
        updates = localizer.localize(text, items)
        refine_s.append(time.perf_counter() - start)
        return updates

    started = time.perf_counter()
    with milvus_uri(args.milvus) as uri:
        # The stage is off in the pipeline: the same answers are refined below, so both
        # scores share one ranking.
        cfg = ServeConfig(model_path=str(args.model), milvus=MilvusConfig(uri=uri, collection=args.collection))
        pipeline = local_pipeline(cfg, loader=lambda _: (model, processor))
        try:
            answers = {}
            for q in queries:
                outcome = asyncio.run(pipeline.run(QueryRequest(query=q.text, top_k=args.top_k)))
                answers[q.query_id] = [Answer(r.image_id, r.uri, r.box) for r in outcome.results]
        finally:
            pipeline.stages.store.close()  # type: ignore[attr-defined]
    search_s = time.perf_counter() - started
    metrics = zoom_box_recall(answers, queries, refine, ks=(1, 5, 10), taus=(0.5, 0.7, 0.9))
    refine_ms = np.asarray(refine_s) * 1000.0
    return {
        **metrics,
        "test_queries": all_queries,
        "localize_ms_per_query_p50": round(float(np.percentile(refine_ms, 50)), 2) if len(refine_ms) else None,
        "localize_ms_per_query_p95": round(float(np.percentile(refine_ms, 95)), 2) if len(refine_ms) else None,
        "search_seconds": round(search_s, 1),
        "settings": {**localize_cfg.model_dump(), "top_k": args.top_k, "model": str(args.model),
                     "data": str(args.data), "torch_threads": args.threads},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
