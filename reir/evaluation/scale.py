"""Cost per query at a larger gallery than the benchmark's test split.

The test split has a few hundred images; the cost of an exhaustive scan grows with the gallery
and reir's does not (much), so the ratio is measured on a gallery grown by replication:
:func:`replicate` copies every encoded image (ids ``c{k}_{id}``) with its boxes, objectness and
size, and its instance vectors (and its global retrieval vector) plus small Gaussian noise,
re-normalized: near-duplicates of real images, as ``bench/query_scale.py`` grows its galleries.
Answers on such a gallery measure cost, not quality (a copy of the right image is a near-tie).

:class:`ArrayStore` holds the same rows in memory and searches them exactly (numpy), with
the :class:`reir.serving.pipeline.ContextStore` interface, so reir's query path runs over an
in-memory index just as the baselines do (the milvus-lite file measures the shipped store too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def noisy_copies(vectors: np.ndarray, copies: int, noise: float, seed: int) -> np.ndarray:
    """``[n, D]`` -> ``[copies * n, D]``: copy 0 is ``vectors``, later ones add Gaussian noise
    of norm about ``noise`` and are re-normalized."""
    rng = np.random.default_rng(seed)
    out = [np.asarray(vectors, dtype=np.float32)]
    for _ in range(1, copies):
        out.append(_unit(vectors + noise * rng.standard_normal(vectors.shape) / np.sqrt(vectors.shape[1])))
    return np.concatenate(out)


def copy_id(image_id: str, k: int) -> str:
    """The id of copy ``k`` of an image (copy 0 is the image itself)."""
    return image_id if k == 0 else f"c{k}_{image_id}"


def replicate(columns: Sequence[Mapping[str, np.ndarray]], copies: int, *, noise: float = 0.05,
              seed: int = 0) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Ingestion's row columns (``reir.platform.schema`` names) -> ``copies`` times as many
    images: copy k of every row with ``copy_id(image_id, k)``, the same box, objectness, rank
    and size, and a noisy copy of its vector."""
    from reir.platform import schema as S

    out = []
    for k in range(copies):
        for c in columns:
            if not len(c[S.IMAGE_ID]):
                continue
            emb = np.asarray(c[S.EMBEDDING], dtype=np.float32)
            copy = dict(c)
            if k:
                copy[S.IMAGE_ID] = np.asarray([copy_id(str(i), k) for i in c[S.IMAGE_ID]], dtype=object)
                copy[S.URI] = np.asarray([f"{u}#copy{k}" for u in c[S.URI]], dtype=object)
                copy[S.EMBEDDING] = noisy_copies(emb, 2, noise, seed + k)[len(emb):]
            out.append(copy)
    return out


class ArrayStore:
    """Ingestion's rows in memory, searched exactly; a :class:`ContextStore` for the query path."""

    def __init__(self, columns: Sequence[Mapping[str, np.ndarray]]) -> None:
        from reir.platform import schema as S
        from reir.platform.store import Hit

        cols = [c for c in columns if len(c[S.IMAGE_ID])]
        self.vectors = np.concatenate([np.asarray(c[S.EMBEDDING], dtype=np.float32) for c in cols])
        self.rows: list[Hit] = []
        for c in cols:
            for i in range(len(c[S.IMAGE_ID])):
                image_id, version = str(c[S.IMAGE_ID][i]), str(c[S.MODEL_VERSION][i])
                self.rows.append(Hit(
                    pk=S.make_pk(version, image_id, int(c[S.RANK][i])), image_id=image_id, uri=str(c[S.URI][i]),
                    box=S.as_box(c[f][i] for f in S.BOX_FIELDS), score=0.0, instance_score=float(c[S.SCORE][i]),
                    model_version=version, image_size=(float(c[S.IMAGE_W][i]), float(c[S.IMAGE_H][i])),
                    n_instances=int(c[S.N_INSTANCES][i]),
                ))  # fmt: skip
        self.by_image: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            self.by_image.setdefault(row.image_id, []).append(i)

    def __len__(self) -> int:
        return len(self.rows)

    def _hit(self, i: int, score: float, with_vector: bool) -> Any:
        from dataclasses import replace

        return replace(self.rows[i], score=score, embedding=self.vectors[i] if with_vector else None)

    def search(self, vectors: np.ndarray, top_n: int, filter: Any = None) -> list[list[Any]]:
        out = []
        for q in np.atleast_2d(vectors).astype(np.float32):
            sims = self.vectors @ q
            n = min(top_n, len(sims))
            top = np.argpartition(-sims, n - 1)[:n]
            top = top[np.argsort(-sims[top], kind="stable")]
            out.append([self._hit(int(i), float(sims[i]), False) for i in top])
        return out

    def context(self, hits: Sequence[Any], *, model_version: str | None = None) -> dict[str, list[Any]]:
        return {h.image_id: [self._hit(i, 0.0, True) for i in self.by_image.get(h.image_id, [])] for h in hits}

    def rows_for_images(self, image_ids: Sequence[str], *, model_version: str | None = None,
                        with_vectors: bool = True, max_per_image: int = 64) -> dict[str, list[Any]]:  # fmt: skip
        return {i: [self._hit(j, 0.0, with_vectors) for j in self.by_image.get(i, [])[:max_per_image]]
                for i in image_ids if i in self.by_image}  # fmt: skip

    def close(self) -> None:
        return None


def time_queries(answer: Any, texts: Sequence[str], top_k: int = 10) -> dict[str, float]:
    """Mean and median milliseconds per query, one at a time, after one untimed warm-up."""
    import time

    answer(texts[0], top_k)
    times = []
    for text in texts:
        started = time.perf_counter()
        answer(text, top_k)
        times.append(1000.0 * (time.perf_counter() - started))
    return {"ms_per_query": float(np.mean(times)), "p50_ms": float(np.median(times)), "queries": len(times)}


def _scaled_vectors(vectors: np.ndarray, ids: Sequence[str], scaled_ids: Sequence[str], copies: int,
                    noise: float, seed: int) -> np.ndarray:  # fmt: skip
    """The retriever's image vectors for the replicated gallery, in ``scaled_ids`` order."""
    grown = noisy_copies(vectors, copies, noise, seed)
    row = {copy_id(i, k): k * len(ids) + n for k in range(copies) for n, i in enumerate(ids)}
    return grown[[row[i] for i in scaled_ids]]


def scale_costs(cfg: Any, encoded: Any, vectors: np.ndarray | None, queries: Sequence[Any], *,
                echo: Any = print) -> dict[str, Any]:  # fmt: skip
    """Cost per query of every system on the gallery replicated to ``cfg.scale_images`` images
    (``cfg.scale_queries`` queries): reir over an in-memory exact index and over a milvus-lite
    file, and the baselines as :func:`reir.evaluation.comparison.run_comparison` runs them."""
    import math

    import torch

    from reir.evaluation.comparison import (
        BaselineSystems,
        EncodedGallery,
        image_retriever_dir,
        reir_answer,
        reir_variants,
        select_queries,
        write_index,
    )

    copies = max(1, math.ceil(cfg.scale_images / max(1, encoded.images)))
    columns = replicate(encoded.ok_columns(), copies, noise=cfg.scale_noise, seed=cfg.seed)
    scaled = EncodedGallery(encoded.model_dir, encoded.model_version, columns, encoded.images * copies, 0, 0.0)
    gallery = scaled.instance_gallery()
    texts = [q.text for q in select_queries(queries, cfg.scale_queries, cfg.seed)]
    out: dict[str, Any] = {"images": len(gallery.image_ids), "instances": len(gallery.boxes), "copies": copies,
                           "noise": cfg.scale_noise, "systems": {}}  # fmt: skip
    systems = out["systems"]
    echo(f"scale: {out['images']} images ({copies} noisy copies of each), {out['instances']} instances, "
         f"{len(texts)} queries")  # fmt: skip
    answer, close = reir_answer(encoded.model_dir, None, rerank=True, threads=cfg.threads, store=ArrayStore(columns))
    try:
        systems["reir_in_memory_index"] = time_queries(answer, texts)
    finally:
        close()
    write_index(scaled, cfg.work_dir / "scale.db")
    for name, kw in reir_variants(cfg, ann=False).items():
        answer, close = reir_answer(encoded.model_dir, cfg.work_dir / "scale.db", threads=cfg.threads, **kw)
        try:
            systems[name] = time_queries(answer, texts)
        finally:
            close()
    retriever = image_retriever_dir(cfg)
    grown = None
    if retriever is not None and vectors is not None:
        base_ids = sorted({str(i) for c in encoded.ok_columns() for i in c["image_id"]})
        grown = _scaled_vectors(vectors, base_ids, gallery.image_ids, copies, cfg.scale_noise, cfg.seed)
    torch.set_num_threads(cfg.threads)
    baselines = BaselineSystems(encoded.model_dir, gallery, retriever_dir=retriever if grown is not None else None,
                                image_vectors=grown, rescore_pool=cfg.rescore_pool)  # fmt: skip
    for name, baseline in baselines.answers().items():
        systems[name] = time_queries(baseline, texts)
    reirs = ["reir", "reir_in_memory_index", *(f"reir_pool{p}" for p in cfg.pools)]
    out["cost_ratio"] = {f"{scan}/{reir}": systems[scan]["ms_per_query"] / systems[reir]["ms_per_query"]
                         for scan in ("rerank_scan", "rerank_scan_cached") for reir in reirs}  # fmt: skip
    echo("| system | ms / query (mean) | p50 |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {m['ms_per_query']:.1f} | {m['p50_ms']:.1f} |" for name, m in systems.items()))
    echo("cost per query against reir: " + ", ".join(f"{k} x{v:.1f}" for k, v in out["cost_ratio"].items()))
    return out
