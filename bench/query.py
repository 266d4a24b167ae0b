"""Query cost benchmark: HTTP latency/throughput through Ray Serve on a >= 100k-instance collection.

    python bench/query.py --out bench_query.json            # defaults: 100k instances, 10k images

What it does (all on this machine, loopback only, bounded in count and time):
1. Saves the ``tiny`` model (or ``--model``) to a checkpoint dir and writes ``--instances``
   rows (random unit vectors + fake boxes, ``--instances / --images`` per image) straight into a
   milvus-lite *server* (EmbeddedMilvus). Random vectors: this measures cost, not quality.
2. In-process :class:`~reir.serving.pipeline.QueryPipeline` p50 (the HTTP route's code, no HTTP), and
   the HTTP/in-process p50 ratio from queries that alternate between the two (same load).
3. The Serve app (``build_app`` path, 2 encoder replicas) over HTTP at concurrency 1 / 8 / 32:
   p50/p95/p99, throughput, and the per-stage medians the service reports (``timings_ms``).
4. Exhaustive REC scan cost: the model's per-image REC cost (encode one image + score its
   instances against the query), measured on ``--rec-sample`` images and *extrapolated* to
   ``--rec-images`` (10k) images, divided by the HTTP p50.
5. Load: 32 concurrent clients for ``--load-seconds``; halfway, one encoder replica is killed;
   counts 5xx, the error rate, and the seconds until Serve has both replicas running again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ["red", "blue", "green", "yellow", "small", "large", "circle", "square", "triangle", "left", "right", "of",
         "the", "above", "below", "biggest", "next", "to"]


def percentiles(values_s: list[float]) -> dict[str, float]:
    arr = np.asarray(values_s) * 1000.0
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean()), "n": len(values_s)}


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def fill(uri: str, collection: str, *, dim: int, version: str, instances: int, images: int) -> float:
    from reir.platform import schema as S
    from reir.platform.store import MilvusStore

    per_image = max(1, instances // images)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with MilvusStore(uri, collection, dim=dim, upsert_batch_size=5000) as store:
        store.build_index("AUTOINDEX")  # before the rows: flush seals segments with this index
        batch = 10_000
        for lo in range(0, instances, batch):
            n = min(batch, instances - lo)
            vecs = rng.normal(size=(n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            xy = rng.uniform(0, 400, size=(n, 2))
            wh = rng.uniform(8, 200, size=(n, 2))
            rows = []
            for j in range(n):
                i = lo + j
                image_id, rank = f"b{i // per_image:07d}", i % per_image
                rows.append({
                    S.PK: S.make_pk(version, image_id, rank), S.IMAGE_ID: image_id, S.URI: f"/bench/{image_id}.jpg",
                    S.BOX_X: float(xy[j, 0]), S.BOX_Y: float(xy[j, 1]), S.BOX_W: float(wh[j, 0]),
                    S.BOX_H: float(wh[j, 1]), S.SCORE: float(rng.uniform()), S.RANK: rank,
                    S.MODEL_VERSION: version, S.EMBEDDING: vecs[j],
                })  # fmt: skip
            store.upsert(rows)
        # Seal the growing segment: milvus-lite searches unflushed rows by brute force in Python.
        store.client.flush(collection)
        store.load()
        assert store.count() == instances, store.count()
    return time.perf_counter() - start


def timed(fn: Callable[[], Any], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def http_phase(url: str, texts: list[str], concurrency: int, total: int) -> dict[str, Any]:
    import requests

    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    codes: dict[int, int] = {}
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        t = time.perf_counter()
        resp = session.post(url, json={"query": texts[i % len(texts)], "top_k": 10}, timeout=120)
        dt = time.perf_counter() - t
        with lock:
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            if resp.status_code == 200:
                latencies.append(dt)
                body = resp.json()
                for k, v in body["timings_ms"].items():
                    stages.setdefault(k, []).append(v)
                stages.setdefault("http_overhead", []).append(dt * 1000.0 - body["timings_ms"]["total"])

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(concurrency * 2, total))))  # warm-up
        latencies.clear(), stages.clear(), codes.clear()
        start = time.perf_counter()
        list(pool.map(one, range(total)))
        wall = time.perf_counter() - start
    return {**percentiles(latencies), "concurrency": concurrency, "qps": total / wall, "status_codes": codes,
            "stage_p50_ms": {k: float(np.median(v)) for k, v in stages.items()}}


def interleaved(url: str, search: Callable[[str], Any], texts: list[str], n: int) -> dict[str, Any]:
    """In-process and HTTP queries alternated one by one, so both see the same machine load."""
    import requests

    local, http = [], []
    with requests.Session() as session:
        for i in range(n + 3):
            text = texts[i % len(texts)]
            t = time.perf_counter()
            search(text)
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            assert session.post(url, json={"query": text, "top_k": 10}, timeout=120).status_code == 200
            if i >= 3:  # warm-up
                local.append(t_local)
                http.append(time.perf_counter() - t)
    lp, hp = percentiles(local)["p50_ms"], percentiles(http)["p50_ms"]
    return {"inprocess_p50_ms": lp, "http_p50_ms": hp, "ratio": hp / lp, "n": n}


def rec_cost_per_image(model: Any, processor: Any, sample: int, batch: int = 16) -> float:
    """Seconds per image for a REC pass: encode the image's instances, score them against the query."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(1)
    size = getattr(processor, "image_size", 224)
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    text = processor.text(["the small red circle left of the blue square"])
    with torch.inference_mode():
        t_emb = model.encode_text(text["input_ids"], text["attention_mask"]).embeddings
        model.score(t_emb, model.encode_images(processor.images(imgs[:2])).embeddings[0])  # warm-up
        start = time.perf_counter()
        done = 0
        while done < sample:
            out = model.encode_images(processor.images(imgs))
            model.score(t_emb, out.embeddings.reshape(-1, out.embeddings.shape[-1]))
            done += batch
    return (time.perf_counter() - start) / done


def replica_actors(app: str, deployment: str) -> list[str]:
    from ray.util import list_named_actors

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def running(app: str, deployment: str) -> int:
    from ray import serve

    return int(serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0))


def load_phase(url: str, texts: list[str], seconds: float, concurrency: int, app: str) -> dict[str, Any]:
    import ray
    import requests

    stop = threading.Event()
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        with requests.Session() as session:
            i = k
            while not stop.is_set():
                try:
                    status = session.post(url, json={"query": texts[i % len(texts)], "top_k": 10}, timeout=60).status_code
                except requests.RequestException:
                    status = 599  # connection-level failure, counted as a server error
                with lock:
                    codes[status] = codes.get(status, 0) + 1
                i += concurrency

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    victims = replica_actors(app, "QueryEncoder")
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
    time.sleep(seconds / 2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    recovered_s = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if running(app, "QueryEncoder") >= len(victims):
            recovered_s = time.monotonic() - killed_at
            break
        time.sleep(0.5)
    total = sum(codes.values())
    errors = sum(v for k, v in codes.items() if k >= 500)
    return {"requests": total, "errors_5xx": errors, "replica_kill_error_rate": errors / max(1, total),
            "status_codes": codes, "seconds": seconds, "concurrency": concurrency,
            "replica_recovered_s": recovered_s, "killed_replica": victims[0]}


def progress(result: dict[str, Any]) -> None:
    print("progress: " + json.dumps(result, default=float), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default="tiny", help="model preset to save and serve")
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level (x concurrency/8)")
    parser.add_argument("--inprocess", type=int, default=200)
    parser.add_argument("--rec-sample", type=int, default=64)
    parser.add_argument("--rec-images", type=int, default=10_000)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from reir.model import create_model
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.platform.milvus_server import EmbeddedMilvus, free_port
    from reir.platform.modeling import model_version_for
    from reir.platform.store import MilvusStore
    from reir.serving.app import app_for
    from reir.serving.pipeline import LocalStages, QueryPipeline, QueryRequest
    from reir.serving.rerank import Reranker
    from reir.serving.retriever import QueryEncoder

    torch.manual_seed(0)
    torch.set_num_threads(1)
    # Ray first: on a busy 2-core machine its start-up is the step most likely to time out.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="reir-bench-"))
    model, processor = create_model(args.model)
    model.eval()
    ckpt = work / f"{args.model}-ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    version = model_version_for(ckpt)
    texts = queries(500)
    result: dict[str, Any] = {"model": args.model, "instances": args.instances, "images": args.images,
                              "cpu_count": os.cpu_count()}
    with EmbeddedMilvus(work / "milvus" / "bench.db") as milvus:
        encoder = QueryEncoder(model, processor, model_version=version)
        result["fill_seconds"] = fill(milvus.uri, "bench", dim=encoder.dim, version=version,
                                      instances=args.instances, images=args.images)
        store = MilvusStore(milvus.uri, "bench")
        store.load()
        reranker = Reranker(model, processor, calibration=encoder.calibration)
        pipeline = QueryPipeline(LocalStages(encoder, store, reranker, discover_threshold=0.5), candidates=100)
        it = iter(range(10**9))

        def search(text: str) -> Any:
            return asyncio.run(pipeline.run(QueryRequest(text, top_k=10)))

        inproc = timed(lambda: search(texts[next(it) % len(texts)]), args.inprocess)
        result["inprocess"] = percentiles(inproc)
        enc_only = timed(lambda: encoder.encode([texts[next(it) % len(texts)]]), args.inprocess)
        result["inprocess_encode_p50_ms"] = percentiles(enc_only)["p50_ms"]

        per_image = rec_cost_per_image(model, processor, args.rec_sample)
        result["rec_per_image_ms"] = per_image * 1000.0

        progress(result)
        port = free_port()
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        cfg = ServeConfig(model_path=str(ckpt), milvus=MilvusConfig(uri=milvus.uri, collection="bench"),
                          encoder_replicas=2, num_cpus_encoder=0.5, num_cpus_searcher=0.5, num_cpus_ingress=0.5,
                          candidates=100)
        serve.run(app_for(cfg), name="bench", route_prefix="/", logging_config=quiet)
        url = f"http://127.0.0.1:{port}/v1/search"
        try:
            result["http"] = {}
            for c in (1, 8, 32):
                result["http"][str(c)] = http_phase(url, texts, c, max(args.requests, args.requests * c // 8))
                progress(result)
            one = result["http"]["1"]
            result["p50_ms"], result["p95_ms"], result["p99_ms"] = one["p50_ms"], one["p95_ms"], one["p99_ms"]
            result["qps"] = max(v["qps"] for v in result["http"].values())
            result["interleaved"] = interleaved(url, search, texts, args.inprocess)
            result["http_vs_inprocess_p50_ratio"] = result["interleaved"]["ratio"]
            progress(result)
            scan_ms = per_image * 1000.0 * args.rec_images
            result["rec_scan"] = {"images": args.rec_images, "extrapolated_ms": scan_ms,
                                  "measured_images": args.rec_sample, "note": "per-image cost measured, then x images"}
            result["rec_scan_cost_ratio"] = scan_ms / one["p50_ms"]
            if args.load_seconds > 0:
                result["load"] = load_phase(url, texts, args.load_seconds, 32, "bench")
        finally:
            store.close()
            serve.shutdown()
            ray.shutdown()
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"summary: p50 {result['p50_ms']:.1f} ms (in-process {result['inprocess']['p50_ms']:.1f} ms, "
          f"ratio {result['http_vs_inprocess_p50_ratio']:.2f}), qps {result['qps']:.0f}, "
          f"REC scan x{result['rec_scan_cost_ratio']:.0f} costlier, median stage ms {one['stage_p50_ms']}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
