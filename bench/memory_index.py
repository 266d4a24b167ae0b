"""The searcher's in-memory index alone (no Milvus), at sizes milvus-lite takes an hour to fill.

    PYTHONPATH=. python bench/memory_index.py --instances 1000000 --source /tmp/gallery.npz \
        [--queries 200] [--recall-target 0.97] [--out FILE]

Builds :class:`reir.platform.memory_index.MemoryIndex` twice over the same rows, exact and with
inverted lists (:class:`~reir.platform.memory_index.AnnSpec`), from ``bench/query_scale.py``'s
generator: ``--source random`` (unit vectors, the worst case) or an ``.npz`` written by
``bench/query_quality.py encode`` (the trained model's instance embeddings, replicated with
noise, and its text queries, which are then the queries). With lists, ``used`` false says the
calibration probed more than half of them and the index scans every row (the search figures are
then the exact scan's). Reports per build the time, the bytes
held and the process's RSS, and per search path p50/p95/p99 of ``search(query, 100)`` and
recall@100 against the exact index. ``--out`` appends the result to a JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_scale import rss_mb, unit, vectors

from reir.platform import schema as S
from reir.platform.memory_index import AnnSpec, MemoryIndex, Rows, build_lists


def rows(source: str, instances: int, dim: int, per_image: int) -> Rows:
    vecs = np.concatenate(list(vectors(source, instances, dim)))
    images = np.arange(instances) // per_image
    columns: dict[str, Any] = {
        S.PK: [f"v1:img{i}:{r}" for i, r in zip(images.tolist(), (np.arange(instances) % per_image).tolist())],
        S.IMAGE_ID: [f"img{i}" for i in images.tolist()], S.URI: [""] * instances, S.MODEL_VERSION: ["v1"] * instances,
        **{f: np.zeros(instances, np.float32) for f in (*S.BOX_FIELDS, S.SCORE)},
    }  # fmt: skip
    return Rows(vecs, columns, has_context=False)


def queries(source: str, count: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    if source == "random":
        return unit(rng.normal(size=(count, dim)))
    texts = unit(np.load(source)["query_embeddings"])
    return texts[rng.choice(len(texts), size=min(count, len(texts)), replace=False)]


def timed_search(index: MemoryIndex, qs: np.ndarray) -> tuple[list[list[str]], dict[str, float]]:
    found, took = [], []
    for q in qs:
        t = time.perf_counter()
        hits = index.search(q, 100)[0]
        took.append((time.perf_counter() - t) * 1000)
        found.append([h.pk for h in hits])
    p = np.percentile(took, [50, 95, 99])
    return found, {"p50_ms": round(float(p[0]), 2), "p95_ms": round(float(p[1]), 2), "p99_ms": round(float(p[2]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--source", default="random")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--recall-target", type=float, default=0.97)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    t = time.perf_counter()
    data = rows(args.source, args.instances, args.dim, args.per_image)
    result: dict[str, Any] = {"instances": args.instances, "source": Path(args.source).name,
                              "generate_s": round(time.perf_counter() - t, 1)}  # fmt: skip
    qs = queries(args.source, args.queries, args.dim)
    t = time.perf_counter()
    exact = MemoryIndex(data, partition=None, signal=None)
    result["exact"] = {"build_s": round(time.perf_counter() - t, 1), "mb": round(exact.nbytes / 2**20, 1)}
    truth, result["exact"]["search"] = timed_search(exact, qs)
    del exact
    t = time.perf_counter()
    ann = MemoryIndex(data, partition=None, signal=None, ann=AnnSpec(min_rows=1, recall=args.recall_target))
    lists = ann.lists
    result["lists"] = {"build_s": round(time.perf_counter() - t, 1), "used": lists is not None,
                       "recall_target": args.recall_target}  # fmt: skip
    if lists is None:  # the calibration probed more than half the lists: the index scans every row
        lists, _ = build_lists(data.vectors, AnnSpec(min_rows=1, recall=args.recall_target))
    result["lists"].update({"mb": round(ann.nbytes / 2**20, 1), "lists": len(lists), "nprobe": lists.nprobe,
                            "calibrated_recall": round(lists.recall, 4)})  # fmt: skip
    found, result["lists"]["search"] = timed_search(ann, qs)
    result["lists"]["recall_at_100"] = round(float(np.mean([len(set(a) & set(b)) / 100 for a, b in
                                                            zip(truth, found, strict=True)])), 4)  # fmt: skip
    result["rss_mb"] = round(rss_mb(os.getpid()), 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    if args.out:
        path = Path(args.out)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*runs, result], indent=2) + "\n")


if __name__ == "__main__":
    main()
