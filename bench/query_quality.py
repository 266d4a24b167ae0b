"""Answer quality of the scaled query path: BR@k through the ANN index vs exact search.

    python bench/query_quality.py encode --model DIR --data demo_out/data --out /tmp/gallery.npz
    python bench/query_quality.py brk --model DIR --data demo_out/data --source /tmp/gallery.npz \
        --uri URI --collection C --instances 1000000 [--queries 400] [--out FILE]

``encode``: the test split's images through the ingestion encoder (the trained model's own
instance embeddings, boxes, image sizes) and the test queries' text embeddings. ``brk``: the
same :class:`QueryPipeline` (encode once, one search, keyed context, re-rank) answers every
query twice, once over the Milvus collection that ``query_scale.py fill --source`` built from
that file and once over an in-memory exact store holding the same rows; BR@k of both, and
the recall@100 of the ANN candidates against the exact ones for the same text queries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_scale import BATCH, VERSION, Gallery, ray_process_rss_mb, rss_mb, vectors


def encode(args: argparse.Namespace) -> dict[str, Any]:
    from reir.data.samples import test_queries
    from reir.ingestion.encoder import InstanceEncoder
    from reir.platform import schema as S
    from reir.platform.modeling import load_reir_model
    from reir.serving.retriever import QueryEncoder

    model, processor = load_reir_model(args.model)
    files = sorted((Path(args.data) / "images" / "test").glob("*.jpg"))
    enc = InstanceEncoder(model, processor, model_version=VERSION, top_k=10)
    cols: dict[str, list[Any]] = {k: [] for k in ("embeddings", "image_id", "rank", "n_instances", "box", "size")}
    start = time.perf_counter()
    for lo in range(0, len(files), 32):
        chunk = files[lo : lo + 32]
        out = enc.rows_for_batch({"image_id": np.array([f.stem for f in chunk], dtype=object),
                                  "uri": np.array([str(f) for f in chunk], dtype=object),
                                  "bytes": np.array([f.read_bytes() for f in chunk], dtype=object)})  # fmt: skip
        ok = out[S.RANK] >= 0
        cols["embeddings"].append(out[S.EMBEDDING][ok])
        cols["image_id"].append(out[S.IMAGE_ID][ok].astype(str))
        cols["rank"].append(out[S.RANK][ok])
        cols["n_instances"].append(out[S.N_INSTANCES][ok])
        cols["box"].append(np.stack([out[f][ok] for f in S.BOX_FIELDS], 1))
        cols["size"].append(np.stack([out[S.IMAGE_W][ok], out[S.IMAGE_H][ok]], 1))
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    queries = test_queries(Path(args.data))
    arrays["query_embeddings"] = QueryEncoder(model, processor).encode([q.text for q in queries])
    np.savez(args.out, **arrays)
    return {"phase": "encode", "images": len(files), "instances": len(arrays["rank"]), "queries": len(queries),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


class ExactStore:
    """The same rows in memory, searched exhaustively: the reference the ANN is held to."""

    def __init__(self, source: str, instances: int, dim: int, per_image: int) -> None:
        from reir.platform import schema as S

        self.vectors = np.concatenate(list(vectors(source, instances, dim)))
        gallery = Gallery(source, per_image)
        self.rows = [gallery.row(i) for i in range(instances)]
        self.by_image: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            self.by_image.setdefault(row[S.IMAGE_ID], []).append(i)

    def _hit(self, i: int, score: float, with_vector: bool) -> Any:
        from reir.platform import schema as S
        from reir.platform.store import Hit

        r = self.rows[i]
        return Hit(pk=S.make_pk(VERSION, r[S.IMAGE_ID], r[S.RANK]), image_id=r[S.IMAGE_ID], uri=r[S.URI],
                   box=S.as_box(r[f] for f in S.BOX_FIELDS), score=score, instance_score=r[S.SCORE],
                   model_version=VERSION, embedding=self.vectors[i] if with_vector else None,
                   image_size=(r[S.IMAGE_W], r[S.IMAGE_H]), n_instances=r[S.N_INSTANCES])  # fmt: skip

    def search(self, vecs: np.ndarray, top_n: int, filter: Any = None) -> list[list[Any]]:
        out = []
        for q in np.atleast_2d(vecs).astype(np.float32):
            sims = self.vectors @ q
            top = np.argpartition(-sims, top_n)[:top_n]
            top = top[np.argsort(-sims[top])]
            out.append([self._hit(int(i), float(sims[i]), False) for i in top])
        return out

    def context(self, hits: Sequence[Any], *, model_version: str | None = None) -> dict[str, list[Any]]:
        return {h.image_id: [self._hit(i, 0.0, True) for i in self.by_image[h.image_id]] for h in hits}


def brk(args: argparse.Namespace) -> dict[str, Any]:
    from reir.data.samples import test_queries
    from reir.evaluation.metrics import Prediction
    from reir.evaluation.runner import evaluate_predictions
    from reir.platform.modeling import load_reir_model
    from reir.platform.store import MilvusStore
    from reir.serving.pipeline import LocalStages, QueryPipeline, QueryRequest
    from reir.serving.rerank import Reranker
    from reir.serving.retriever import QueryEncoder

    queries = test_queries(Path(args.data))[: args.queries]
    model, processor = load_reir_model(args.model)
    encoder = QueryEncoder(model, processor, model_version=VERSION)
    reranker = Reranker(model, processor, calibration=encoder.calibration)
    exact = ExactStore(args.source, args.instances, args.dim, args.per_image)
    result: dict[str, Any] = {"phase": "brk", "instances": args.instances, "queries": len(queries),
                              "copy_is_hit": bool(args.copy_is_hit)}
    with MilvusStore(args.uri, args.collection) as ann:
        ann.load()
        if args.memory_index:  # the searcher's in-memory index (inverted lists from 200k rows), as served
            ann.use_memory_index("on", wait=True)
            status = ann.memory_index.status()  # type: ignore[union-attr]
            result["memory_index"] = {"rows": status.rows, "lists": status.lists, "nprobe": status.nprobe,
                                      "load_s": status.load_s}  # fmt: skip
        for name, store in (("ann", ann), ("exact", exact)):
            # the whole collection (one version here), as the recall search below: one scope for the memory index
            pipeline = QueryPipeline(LocalStages(encoder, store, reranker, discover_threshold=0.5),
                                     filter_model_version=False)
            preds, totals, hits = {}, [], {}
            for q in queries:
                outcome = asyncio.run(pipeline.run(QueryRequest(q.text, top_k=10)))
                preds[q.query_id] = [Prediction(source_image(r.image_id) if args.copy_is_hit else r.image_id, r.box)
                                     for r in outcome.results]  # fmt: skip
                totals.append(outcome.timings_ms["total"])
                hits[q.query_id] = {h.pk for h in store.search(encoder.encode([q.text]), 100)[0]}
            metrics = evaluate_predictions(preds, queries)
            result[name] = {"brk": {k: round(float(v), 4) for k, v in metrics.items()},
                            "total_p50_ms": round(float(np.percentile(totals, 50)), 1)}  # fmt: skip
            result[f"{name}_candidates"] = hits
    ann_c, ex_c = result.pop("ann_candidates"), result.pop("exact_candidates")
    result["recall_at_100_text_queries"] = round(float(np.mean([len(ann_c[k] & ex_c[k]) / 100 for k in ex_c])), 4)
    return result


# The Serve app's deployments (ServeConfig.search_in_ingress / encode_in_searcher).
TOPOLOGIES = {
    "one": {"search_in_ingress": True, "encode_in_searcher": True},
    "two": {"search_in_ingress": False, "encode_in_searcher": True},
    "three": {"search_in_ingress": False, "encode_in_searcher": False},
}


def source_image(image_id: str) -> str:
    """The encoded image a replicated row was copied from (``c{k}_{id}`` -> ``id``)."""
    return re.sub(r"^c\d+_", "", image_id)


def _pct(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} | {"n": len(values_ms)}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    """The whole query path (encode once, ANN, keyed context, re-rank) in process, then the
    same through the Serve app over HTTP at concurrency 1/8/32, on one collection."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from reir.client import Client
    from reir.data.samples import test_queries
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.platform.milvus_server import free_port
    from reir.serving.pipeline import QueryRequest, local_pipeline

    texts = [q.text for q in test_queries(Path(args.data))][: args.queries]
    cfg = ServeConfig(model_path=args.model, milvus=MilvusConfig(uri=args.uri, collection=args.collection),
                      filter_model_version=False, host="127.0.0.1", port=free_port(),
                      **TOPOLOGIES[args.topology])  # fmt: skip
    pipeline = local_pipeline(cfg)
    result: dict[str, Any] = {"phase": "latency", "collection": args.collection, "topology": args.topology,
                              "encode_in_searcher": cfg.encode_in_searcher, "search_in_ingress": cfg.search_in_ingress}
    # The thread count the searcher replica runs with (ServeConfig.num_cpus_searcher), so the
    # HTTP figures below differ from this one by the serving path alone.
    threads = max(1, int(cfg.num_cpus_searcher))
    torch.set_num_threads(threads)
    stages: dict[str, list[float]] = {}
    for i, text in enumerate([*texts[:3], *texts]):
        outcome = asyncio.run(pipeline.run(QueryRequest(text, top_k=10)))
        if i >= 3:  # the first three warm the caches
            for name, ms in outcome.timings_ms.items():
                stages.setdefault(name, []).append(ms)
    result["in_process"] = {**_pct(stages["total"]), "torch_threads": threads}
    result["stage_p50_ms"] = {k: round(float(np.median(v)), 1) for k, v in stages.items()}
    result["reranked"] = outcome.reranked
    result["rss_mb"] = {"bench": round(rss_mb(os.getpid()), 1)}
    if args.server_pid:
        result["rss_mb"]["milvus"] = round(rss_mb(args.server_pid), 1)
    pipeline.stages.store.close()  # type: ignore[attr-defined]
    print(json.dumps(result), file=sys.stderr, flush=True)  # kept even if the HTTP part fails
    if not args.http:
        return result
    import ray

    from reir.platform.raylocal import use_serve_data_plane
    from reir.serving.app import run_app

    use_serve_data_plane()  # HAProxy + direct ingress, as `reir serve` starts Serve
    result["serve_env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    # address="local": a Ray of our own even when another job's cluster runs on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        run_app(cfg)
        client = Client(f"http://127.0.0.1:{cfg.port}")
        # The Searcher loads its in-memory index in the background (searches go to Milvus
        # meanwhile): warm up until two queries in a row answer fast, or 180 s.
        fast, deadline, i = 0, time.monotonic() + 180, 0
        while fast < 2 and time.monotonic() < deadline:
            t = time.perf_counter()
            client.search(texts[i % len(texts)], top_k=10)
            fast = fast + 1 if time.perf_counter() - t < 0.3 else 0
            i += 1
        result["http_warmup_queries"] = i
        for conc in (1, 8, 32):
            def one(text: str) -> float:
                t = time.perf_counter()
                client.search(text, top_k=10)
                return (time.perf_counter() - t) * 1000.0

            with ThreadPoolExecutor(conc) as pool:
                result[f"http_c{conc}"] = _pct(list(pool.map(one, texts)))
        result["http_over_in_process_p50"] = round(result["http_c1"]["p50_ms"] / result["in_process"]["p50_ms"], 2)
        result["rss_mb"]["ray"] = ray_process_rss_mb()
    finally:
        ray.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    lat = sub.add_parser("latency")
    for name in ("--model", "--data", "--uri", "--collection"):
        lat.add_argument(name, required=True)
    lat.add_argument("--queries", type=int, default=200)
    lat.add_argument("--http", action="store_true")
    lat.add_argument("--topology", choices=sorted(TOPOLOGIES), default="one",
                     help="one: the ingress runs the whole query (the default); two: ingress + searcher that "
                          "encodes; three: ingress, QueryEncoder and Searcher apart (the k8s RayService)")
    lat.add_argument("--server-pid", type=int, default=0, help="the Milvus server's pid (its RSS is reported)")
    lat.add_argument("--out", default="")
    b = sub.add_parser("brk")
    for name, default in (("--model", None), ("--data", None), ("--source", None), ("--uri", None)):
        b.add_argument(name, required=True, default=default)
    b.add_argument("--collection", default="model1m")
    b.add_argument("--instances", type=int, default=BATCH)
    b.add_argument("--dim", type=int, default=128)
    b.add_argument("--per-image", type=int, default=10)
    b.add_argument("--queries", type=int, default=400)
    b.add_argument("--copy-is-hit", action="store_true",
                   help="an answer on a noisy copy of the right image counts (the replicated gallery holds "
                        "each image many times, so strict BR@k measures which copy wins, not the search)")
    b.add_argument("--memory-index", action="store_true",
                   help="search the Milvus file through the searcher's in-memory index (milvus-lite at scale)")
    b.add_argument("--out", default="")
    args = p.parse_args()
    result = {"encode": encode, "brk": brk, "latency": latency}[args.cmd](args)
    print(json.dumps(result))
    if getattr(args, "out", "") and args.cmd != "encode":
        path = Path(args.out)
        entries = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*entries, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
