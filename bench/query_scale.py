"""Query path at scale: one ANN search + one keyed context fetch per query, per backend and size.

    python bench/query_scale.py server --dir /tmp/milvus --port-file /tmp/milvus.port   # Milvus 2.3.5, stays up
    python bench/query_scale.py fill --uri URI --collection C --instances 1000000 [--source random|FILE.npz]
    python bench/query_scale.py measure --uri URI --collection C --instances 1000000 [--source ...] \
        [--model DIR] --out bench/results/query-scale-2cpu.json
    python bench/query_scale.py floor --uri - --instances 10000000   # numpy exact search, no Milvus

``fill`` writes ``--instances`` rows (``--per-image`` per image, ranks 0..n-1, image size and count
stored) through :class:`MilvusStore` (so the backend's default index and the per-version
partition are what a deployment gets). ``--source random``: unit vectors from a seeded
generator (the worst case for graph indexes); ``--source FILE.npz`` (``embeddings [N, D]``, from
``encode-gallery``): a trained model's instance embeddings, replicated with small noise to reach
the size. ``measure`` regenerates the same vectors, so recall@100 of the ANN is measured
against exact (numpy) search, and times each stage of the query path in process: the store
search, the keyed context fetch and, with ``--model``, encoding and re-ranking. JSON to stdout;
``--out`` appends it to a results file (one entry per backend/size/source).

``measure --memory-index`` searches through the store's in-memory exact index
(``ServeConfig.memory_index``, on by default for milvus-lite) instead: its load time and the
memory it adds, then the same search / context / recall figures; ``--baseline-queries N`` first
times N searches of the backend itself, ``--api-load-too`` also times reading the rows with the
query iterator (the path a Milvus server takes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

VERSION = "bench"
BATCH = 20_000


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def vectors(source: str, instances: int, dim: int, *, noise: float = 0.05) -> Iterator[np.ndarray]:
    """The gallery's vectors in batches of ``BATCH``, the same on every call (seeded)."""
    base = None if source == "random" else unit(np.load(source)["embeddings"])
    for k, lo in enumerate(range(0, instances, BATCH)):
        n = min(BATCH, instances - lo)
        rng = np.random.default_rng(1000 + k)
        if base is None:
            yield unit(rng.normal(size=(n, dim)))
            continue
        idx = np.arange(lo, lo + n) % len(base)
        # The first copy is the model's own embeddings; later copies are near-duplicates.
        jitter = np.where((np.arange(lo, lo + n) >= len(base))[:, None], noise, 0.0)
        yield unit(base[idx] + jitter * rng.normal(size=(n, base.shape[1])) / np.sqrt(base.shape[1]))


class Gallery:
    """Row i's image id, box, rank, count and size: from the encoded gallery (``--source`` npz;
    copy c > 0 of row r is image ``c{c}_{id}``, a near-duplicate), else synthetic."""

    def __init__(self, source: str, per_image: int) -> None:
        self.per_image = per_image
        # dict(): an NpzFile reads the array from the archive on every item access
        self.meta = None if source == "random" else dict(np.load(source))

    def row(self, i: int) -> dict[str, Any]:
        from reir.platform import schema as S

        if self.meta is None:
            image_id, rank, count = f"b{i // self.per_image:08d}", i % self.per_image, self.per_image
            box, size = ((i * 37) % 400, (i * 91) % 300, 48.0, 40.0), (640.0, 480.0)
        else:
            m, r = self.meta, i % len(self.meta["rank"])
            copy = i // len(self.meta["rank"])
            image_id = str(m["image_id"][r]) if copy == 0 else f"c{copy}_{m['image_id'][r]}"
            rank, count, box, size = int(m["rank"][r]), int(m["n_instances"][r]), m["box"][r], m["size"][r]
        return {S.IMAGE_ID: image_id, S.URI: f"/bench/{image_id}.jpg",
                **{f: float(v) for f, v in zip(S.BOX_FIELDS, box, strict=True)}, S.SCORE: 0.5, S.RANK: rank,
                S.MODEL_VERSION: VERSION, S.IMAGE_W: float(size[0]), S.IMAGE_H: float(size[1]),
                S.N_INSTANCES: count}  # fmt: skip


def rows_for(lo: int, vecs: np.ndarray, gallery: Gallery) -> list[dict[str, Any]]:
    from reir.platform import schema as S

    return [{**gallery.row(lo + j), S.EMBEDDING: vec} for j, vec in enumerate(vecs)]


def fill(args: argparse.Namespace) -> dict[str, Any]:
    from reir.platform.store import MilvusStore

    start = time.perf_counter()
    gallery = Gallery(args.source, args.per_image)
    with MilvusStore(args.uri, args.collection, dim=args.dim, upsert_batch_size=5000) as store:
        for k, vecs in enumerate(vectors(args.source, args.instances, args.dim)):
            store.upsert(rows_for(k * BATCH, vecs, gallery))
            if k % 10 == 0:
                print(f"filled {(k + 1) * BATCH} rows, {time.perf_counter() - start:.0f} s", file=sys.stderr)
        inserted = time.perf_counter() - start
        store.flush()
        t = time.perf_counter()
        store.build_index(args.index)
        store.load()
        built = time.perf_counter() - t
        count = store.count()
        kind = store.index_type()
    return {"phase": "fill", "instances": count, "insert_s": round(inserted, 1), "index_build_and_load_s": round(built, 1),
            "index_type": kind}  # fmt: skip


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def ray_process_rss_mb(prefix: str = "ray::") -> dict[str, float]:
    """RSS of this machine's Ray processes whose title starts with ``prefix`` (Serve replicas,
    the proxy, the controller), summed per title: the memory each deployment costs."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(prefix):
            name = title.split()[0]
            out[name] = round(out.get(name, 0.0) + rss_mb(int(proc.name)), 1)
    return out


def exact_top(queries: np.ndarray, source: str, instances: int, dim: int, k: int) -> np.ndarray:
    """Row indices of the exact top-k by inner product, streamed over the gallery."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for b, vecs in enumerate(vectors(source, instances, dim)):
        sims = queries @ vecs.T
        top = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        best_i = np.concatenate([best_i, top + b * BATCH], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


class KeyIndex(dict):  # type: ignore[type-arg]
    """Primary key -> gallery row number (to compare ANN answers with exact search's rows)."""

    def __init__(self, gallery: Gallery, instances: int) -> None:
        from reir.platform import schema as S

        super().__init__()
        for i in range(instances):
            row = gallery.row(i)
            self[S.make_pk(VERSION, row[S.IMAGE_ID], row[S.RANK])] = i


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "n": len(values)}  # fmt: skip


def query_vectors(args: argparse.Namespace, n: int) -> np.ndarray:
    if args.queries_npz:  # query_quality.py encode's file holds both: the text queries are the ones
        data = np.load(args.queries_npz)
        key = "query_embeddings" if "query_embeddings" in data else "embeddings"
        return unit(data[key][:n])
    return unit(np.random.default_rng(7).normal(size=(n, args.dim)))


def rss_peak_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS differences are what is held."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_index(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Load the store's in-memory exact index (``ServeConfig.memory_index``) of the bench version's
    partition; its load time and the memory it added to this process."""
    from reir.platform.backend import partition_for

    trim()
    before, peak_before = rss_mb(os.getpid()), rss_peak_mb(os.getpid())
    t = time.perf_counter()
    store.use_memory_index("on", args.memory_index_max_rows, model_version=VERSION, wait=True)
    took = time.perf_counter() - t
    trim()
    status = store.memory_index.status()
    out = {"loader": "milvus-lite engine (in process)" if store._lite_engine(store.collection) is not None else "query_iterator",
           "rows": status.rows, "load_s": round(took, 2), "index_mb": status.mb,
           "rss_added_mb": round(rss_mb(os.getpid()) - before, 1),
           "peak_rss_added_mb": round(max(0.0, rss_peak_mb(os.getpid()) - max(before, peak_before)), 1)}  # fmt: skip
    if args.api_load_too:  # the path a Milvus server (or milvus-lite in another process) takes
        t = time.perf_counter()
        rows = store.memory_rows(partition_for(VERSION), args.memory_index_max_rows, direct=False)
        out["query_iterator_load_s"] = round(time.perf_counter() - t, 2)
        out["query_iterator_rows"] = 0 if rows is None else len(rows.vectors)
        del rows
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from reir.platform.store import MilvusStore, SearchFilter

    qv = query_vectors(args, args.queries)
    gallery = Gallery(args.source, args.per_image)
    index = KeyIndex(gallery, args.instances)
    out: dict[str, Any] = {"phase": "measure", "uri_kind": "file" if args.uri.endswith(".db") else "server",
                           "instances": args.instances, "source": Path(args.source).name, "per_image": args.per_image}
    params = {"ef": args.ef} if args.ef else None
    with MilvusStore(args.uri, args.collection, search_params=params) as store:
        store.load()
        flt = SearchFilter(model_version=VERSION)
        out["ef"] = args.ef or "default"
        out["backend"] = "milvus-lite" if store.lite else "milvus-server"
        out["index_type"] = store.index_type()
        if args.memory_index:
            if args.baseline_queries:  # the backend's own search, for comparison, before the index loads
                base_s, base_found = [], []
                for q in qv[: args.baseline_queries]:
                    t = time.perf_counter()
                    hits = store.search(q, 100, flt)[0]
                    base_s.append(time.perf_counter() - t)
                    base_found.append([index[h.pk] for h in hits])
                out["backend_search"] = pct(base_s)
            out["memory_index"] = memory_index(store, args)
            out["index_type"] = "in-memory exact (numpy float32)"
        for q in qv[:3]:  # warm
            store.context(store.search(q, 100, flt)[0][:50], model_version=VERSION)
        search_s, fetch_s, found = [], [], []
        for q in qv:
            t = time.perf_counter()
            hits = store.search(q, 100, flt)[0]
            search_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ctx = store.context(hits[:50], model_version=VERSION)
            fetch_s.append(time.perf_counter() - t)
            found.append([index[h.pk] for h in hits])
            assert sum(len(v) for v in ctx.values()) >= len({h.image_id for h in hits[:50]})
        out["search"] = pct(search_s)
        out["context_fetch_50_images"] = pct(fetch_s)
        if args.memory_index:
            out["memory_index"]["answered"] = store.memory_index.status().answered
        if args.recall:
            exact = exact_top(qv, args.source, args.instances, args.dim, 100)
            recall = [len(set(f) & set(e.tolist())) / 100.0 for f, e in zip(found, exact, strict=True)]
            out["recall_at_100"] = round(float(np.mean(recall)), 4)
            # the same rows in the same order as exact search (ties aside: random vectors have none)
            out["same_order_as_exact"] = round(float(np.mean([f == e.tolist() for f, e in zip(found, exact,
                                                                                               strict=True)])), 4)
            if args.memory_index and args.baseline_queries:
                out["backend_recall_at_100"] = round(float(np.mean([
                    len(set(f) & set(e.tolist())) / 100.0 for f, e in zip(base_found, exact, strict=False)])), 4)
    out["rss_mb"] = {"bench": round(rss_mb(os.getpid()), 1)}
    if args.server_pid:
        out["rss_mb"]["milvus"] = round(rss_mb(args.server_pid), 1)
    return out


def floor(args: argparse.Namespace) -> dict[str, Any]:
    """Exact search in this process (numpy, float32): the latency floor without an index, and
    the memory the vectors alone take, at sizes a Milvus build here can not reach in time."""
    start = time.perf_counter()
    gallery = np.empty((args.instances, args.dim), np.float32)
    for k, vecs in enumerate(vectors(args.source, args.instances, args.dim)):
        gallery[k * BATCH : k * BATCH + len(vecs)] = vecs
    filled = time.perf_counter() - start
    times = []
    for q in query_vectors(args, args.queries):
        t = time.perf_counter()
        sims = gallery @ q
        top = np.argpartition(-sims, 100)[:100]
        top[np.argsort(-sims[top])]
        times.append(time.perf_counter() - t)
    return {"phase": "floor", "backend": "numpy exact", "instances": args.instances, "source": Path(args.source).name,
            "search": pct(times), "vectors_gb": round(gallery.nbytes / 2**30, 2), "fill_s": round(filled, 1),
            "rss_mb": {"bench": round(rss_mb(os.getpid()), 1)}}  # fmt: skip


def server(args: argparse.Namespace) -> None:
    import milvus

    from reir.platform.milvus_server import free_port

    srv = milvus.default_server
    srv.set_base_dir(args.dir)
    srv.listen_port = free_port()
    srv.start()
    Path(args.port_file).write_text(f"{srv.listen_port}\n")
    print(f"milvus on http://127.0.0.1:{srv.listen_port}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(60)
    finally:
        srv.stop()


def plot(results: Path, out: Path) -> None:
    """p50 of the store search (and search + context fetch) against collection size, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for e in json.loads(results.read_text()):
        if e.get("phase") == "measure" and e.get("ef", "default") == "default":  # sweeps stay in the JSON
            # the last run per (backend, index, data) and size wins
            latest[(f"{e['backend']} {e['index_type']}, {e['source'].removesuffix('.npz')}", e["instances"])] = e
        elif e.get("phase") == "floor":
            latest[(f"numpy exact, {e['source'].removesuffix('.npz')}", e["instances"])] = e
    fig, ax = plt.subplots(figsize=(8, 6))
    for series in sorted({k for k, _ in latest}):
        rows = sorted((n, e["search"]["p50_ms"], e.get("context_fetch_50_images", {}).get("p50_ms"))
                      for (k, n), e in latest.items() if k == series)  # fmt: skip
        sizes = [r[0] for r in rows]
        line = ax.plot(sizes, [r[1] for r in rows], marker="o", label=f"{series}: search")[0]
        if all(r[2] is not None for r in rows):
            ax.plot(sizes, [r[1] + r[2] for r in rows], marker="s", linestyle="--", color=line.get_color(),
                    label=f"{series}: + keyed context")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="instances in the collection", ylabel="p50 (ms)",
           title="Query store cost per backend (2 shared cores)")  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plot")
    pl.add_argument("--results", default="bench/results/query-scale-2cpu.json")
    pl.add_argument("--out", default="bench/results/query-scale-2cpu.png")
    s = sub.add_parser("server")
    s.add_argument("--dir", required=True)
    s.add_argument("--port-file", required=True)
    for name in ("fill", "measure", "floor"):
        c = sub.add_parser(name)
        c.add_argument("--uri", required=True)
        c.add_argument("--collection", default="scale")
        c.add_argument("--instances", type=int, default=100_000)
        c.add_argument("--per-image", type=int, default=10)
        c.add_argument("--dim", type=int, default=128)
        c.add_argument("--source", default="random", help="random, or an .npz with embeddings [N, D]")
        c.add_argument("--index", default="AUTOINDEX")
        c.add_argument("--queries", type=int, default=200)
        c.add_argument("--queries-npz", default="", help=".npz with query embeddings [Q, D] (default random)")
        c.add_argument("--recall", action="store_true")
        c.add_argument("--server-pid", type=int, default=0)
        c.add_argument("--ef", type=int, default=0, help="HNSW ef to search with (0: the store's default)")
        c.add_argument("--memory-index", action="store_true",
                       help="measure: search through the store's in-memory exact index (ServeConfig.memory_index)")
        c.add_argument("--memory-index-max-rows", type=int, default=5_000_000)
        c.add_argument("--baseline-queries", type=int, default=0,
                       help="with --memory-index: first time this many searches of the backend itself")
        c.add_argument("--api-load-too", action="store_true",
                       help="with --memory-index: also time reading the rows with the query iterator")
        c.add_argument("--out", default="")
    args = p.parse_args()
    if args.cmd == "server":
        server(args)
        return
    if args.cmd == "plot":
        plot(Path(args.results), Path(args.out))
        return
    result = {"fill": fill, "measure": measure, "floor": floor}[args.cmd](args)
    print(json.dumps(result))
    if args.out:
        path = Path(args.out)
        entries = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*entries, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
