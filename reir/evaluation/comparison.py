"""reir against its baselines on one test gallery, with the same stored instances for all.

The gallery is encoded once per checkpoint with ingestion's own :class:`InstanceEncoder`
(the code a Ray Data actor runs); its rows go into a milvus-lite file exactly as the Milvus
sink writes them, and reir answers through :func:`reir.serving.pipeline.local_pipeline` (the
Serve app's encode -> ANN -> re-rank path, in this process). The baselines
(:mod:`reir.evaluation.baselines`) rank the very same instance rows with the same re-ranker:
the two-stage system (an image-level retriever trained on the same data, ``reir train --stage
image-retrieval``, then the re-ranker inside each retrieved image) and the exhaustive re-rank
scan (the re-ranker on every image). Every system answers every selected query one at a time
on the same number of torch threads; ``seconds_per_query`` is that wall time divided by the
number of queries (text encoding included for all of them; gallery encoding, done once and
offline, is reported apart). :func:`scale_costs` measures the cost per query again on a
gallery grown by replication (:mod:`reir.evaluation.scale`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reir.data.formats import ImageSample, Query, load_samples, test_queries
from reir.evaluation.baselines import (
    BASELINE_KS,
    InstanceGallery,
    comparison_table,
    rerank_scan_rank,
    system_summary,
    two_stage_rank,
)
from reir.evaluation.metrics import Prediction
from reir.evaluation.slices import evaluate_slices, has_slices, read_heldout

Answer = Callable[[str, int], list[Prediction]]
COLLECTION = "quality"


@dataclass(frozen=True)
class QualityConfig:
    """One comparison run (``bench/quality.py`` flags)."""

    data_root: Path
    model_dir: Path
    work_dir: Path  # milvus-lite files are written here
    weak_model_dir: Path | None = None
    # the two-stage system's checkpoint (an image-level retrieval head and a re-ranker:
    # `reir train --stage image-retrieval --model RERANK_CHECKPOINT`); None: model_dir when it has one
    two_stage_model_dir: Path | None = None
    max_queries: int | None = None  # a seeded sample of the test queries; the gallery stays whole
    seed: int = 0
    top_k_instances: int | None = None  # instances stored per image, as `reir ingest` stores them [the checkpoint's]
    batch_size: int = 16
    threads: int = 1  # torch threads of every system (reir's query path runs one per encoder CPU)
    rescore_pool: int = 50  # two_stage_rescored: retrieved images the re-ranker orders (reir's head: 50)
    scale_images: int = 0  # > 0: cost per query again on a gallery replicated to about this many images
    scale_queries: int = 30  # queries timed on that gallery
    scale_noise: float = 0.05
    # reir again with each of these re-rank pools (ServeConfig.rerank_candidates): systems "reir_pool{P}"
    pools: tuple[int, ...] = ()
    # ServeConfig.memory_index_ann_min_rows of every reir system (None: the serving default)
    ann_min_rows: int | None = None


def select_queries(queries: Sequence[Query], max_queries: int | None, seed: int) -> list[Query]:
    """All queries, or a seeded sample of ``max_queries`` kept in their original order."""
    if max_queries is None or max_queries >= len(queries):
        return list(queries)
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    keep = set(random.Random(seed).sample(range(len(queries)), max_queries))
    return [q for i, q in enumerate(queries) if i in keep]


@dataclass
class EncodedGallery:
    """One checkpoint's instance rows for the gallery (ingestion's columnar layout)."""

    model_dir: Path
    model_version: str
    columns: list[dict[str, np.ndarray]]
    images: int
    failures: int
    seconds: float

    def ok_columns(self) -> list[dict[str, np.ndarray]]:
        from reir.ingestion.records import STATUS, STATUS_OK

        return [{k: v[c[STATUS] == STATUS_OK] for k, v in c.items()} for c in self.columns]

    def instance_gallery(self) -> InstanceGallery:
        from reir.platform import schema as S

        per_image: dict[str, list[tuple[list[float], np.ndarray, float]]] = {}
        sizes: dict[str, tuple[float, float]] = {}
        for cols in self.ok_columns():
            for i, image_id in enumerate(cols[S.IMAGE_ID]):
                box = [float(cols[name][i]) for name in S.BOX_FIELDS]
                row = (box, np.asarray(cols[S.EMBEDDING][i]), float(cols[S.SCORE][i]))
                per_image.setdefault(str(image_id), []).append(row)
                sizes[str(image_id)] = (float(cols[S.IMAGE_W][i]), float(cols[S.IMAGE_H][i]))
        return InstanceGallery.from_instances(per_image, sizes)


def encode_gallery(model_dir: Path, samples: Sequence[ImageSample], *, top_k: int | None,
                   batch_size: int) -> EncodedGallery:  # fmt: skip
    """Every gallery image through ingestion's encoder (decode, detect, embed, rows); ``top_k``
    None: the checkpoint's stored-instance policy, as `reir ingest` applies it."""
    from reir.ingestion.encoder import InstanceEncoder
    from reir.platform.modeling import load_reir_model, model_version_for

    model, processor = load_reir_model(str(model_dir))
    version = model_version_for(model_dir)
    encoder = InstanceEncoder(model, processor, model_version=version, top_k=top_k)
    started = time.perf_counter()
    columns = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = {"image_id": [s.image_id for s in chunk], "uri": [s.path for s in chunk],
                 "bytes": [Path(s.path).read_bytes() for s in chunk]}  # fmt: skip
        columns.append(encoder.rows_for_batch(batch))
    return EncodedGallery(Path(model_dir), version, columns, encoder.images, encoder.failures,
                          time.perf_counter() - started)  # fmt: skip


def write_index(gallery: EncodedGallery, db_path: Path) -> int:
    """The rows into a milvus-lite file as the Milvus sink writes them; index built, flushed."""
    from reir.platform import schema as S
    from reir.platform.store import MilvusStore

    ok = [c for c in gallery.ok_columns() if len(c[S.IMAGE_ID])]
    if not ok:
        raise ValueError(f"{gallery.model_dir}: the model kept no instance in any gallery image")
    with MilvusStore(str(db_path), COLLECTION) as store:
        store.ensure_collection(int(ok[0][S.EMBEDDING].shape[-1]))
        rows = sum(store.upsert(S.rows_from_columns(c)) for c in ok)
        store.build_index()
        store.flush()
    return rows


def reir_answer(model_dir: Path, db_path: Path | None, *, rerank: bool, threads: int = 1, store: Any = None,
                pool: int | None = None, ann_min_rows: int | None = None) -> tuple[Answer, Callable[[], None]]:  # fmt: skip
    """reir's query path (encode -> ANN -> re-rank) in process over the milvus-lite file
    ``db_path`` or an in-memory ``store`` (:class:`reir.evaluation.scale.ArrayStore`);
    ``pool``: ``ServeConfig.rerank_candidates`` and ``candidates`` (the ANN's top ``pool``, all re-ranked), ``ann_min_rows``:
    ``ServeConfig.memory_index_ann_min_rows`` (None: serving's defaults); returns (answer, close)."""
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.pipeline import QueryRequest, local_pipeline

    milvus = MilvusConfig(uri=str(db_path), collection=COLLECTION) if db_path is not None else MilvusConfig()
    overrides: dict[str, int] = {} if pool is None else {"rerank_candidates": pool, "candidates": pool}
    if ann_min_rows is not None:
        overrides["memory_index_ann_min_rows"] = ann_min_rows
    pipeline = local_pipeline(ServeConfig(model_path=str(model_dir), milvus=milvus, num_cpus_encoder=threads,
                                          **overrides), store=store)  # fmt: skip
    loop = asyncio.new_event_loop()

    def answer(text: str, top_k: int) -> list[Prediction]:
        outcome = loop.run_until_complete(pipeline.run(QueryRequest(text, top_k=top_k, rerank=rerank)))
        return [Prediction(r.image_id, r.box, r.score) for r in outcome.results]

    def close() -> None:
        loop.close()
        pipeline.stages.store.close()  # type: ignore[attr-defined]

    return answer, close


def image_retriever_dir(cfg: QualityConfig) -> Path | None:
    """The two-stage system's checkpoint: ``cfg.two_stage_model_dir``, else ``cfg.model_dir``
    when it has an image-level retrieval head, else None (no two-stage rows)."""
    import json

    if cfg.two_stage_model_dir is not None:
        return cfg.two_stage_model_dir
    config = json.loads((Path(cfg.model_dir) / "config.json").read_text())
    return cfg.model_dir if int((config.get("image_retrieval") or {}).get("hidden_size", 0)) > 0 else None


class BaselineSystems:
    """The baselines' answers over one :class:`InstanceGallery`: ``rerank_scan`` with the
    checkpoint ``model_dir`` (and ``rerank_scan_cached``: the same ranking, with the re-ranker's
    text-free half computed once for the gallery); with an image-retriever checkpoint (its own re-ranker grounds)
    also ``two_stage`` (top images in retrieval order) and ``two_stage_rescored`` (the top
    ``rescore_pool`` retrieved images ordered by the re-ranker)."""

    def __init__(self, model_dir: Path, gallery: InstanceGallery, *, retriever_dir: Path | None = None,
                 image_vectors: np.ndarray | None = None, rescore_pool: int = 50) -> None:  # fmt: skip
        from reir.evaluation.baseline_models import GalleryReranker
        from reir.platform.modeling import load_reir_model
        from reir.serving.retriever import QueryEncoder

        model, processor = load_reir_model(str(model_dir))
        self.gallery, self.rescore_pool = gallery, rescore_pool
        self.encoder, self.scan = QueryEncoder(model, processor), GalleryReranker(model, gallery)
        self.cached_scan = GalleryReranker(model, gallery, cache=True)
        self.retriever: Any = None
        if retriever_dir is not None:
            two, two_processor = load_reir_model(str(retriever_dir))
            if image_vectors is None or len(image_vectors) != len(gallery.image_ids):
                raise ValueError("the two-stage system needs one image vector per gallery image")
            self.retriever, self.vectors = two, np.asarray(image_vectors, dtype=np.float32)
            self.two_encoder, self.grounder = QueryEncoder(two, two_processor), GalleryReranker(two, gallery)

    def image_recall(self, queries: Sequence[Query], ks: Sequence[int] = (1, 10, 50)) -> dict[str, float]:
        """The image retriever alone: the share of queries with an image holding a target among
        its top k images (no box asked), ``{"image_R@k": ...}``."""
        from reir.evaluation.baseline_models import retrieval_text

        hits = np.zeros(len(ks))
        position = {image_id: i for i, image_id in enumerate(self.gallery.image_ids)}
        for q in queries:
            scores = self.vectors @ retrieval_text(self.retriever, self.two_encoder.encode_queries([q.text])[0])
            wanted = [position[i] for i in {t[0] for t in q.targets} | {q.image_id} if i in position]
            rank = min(int((scores > scores[i]).sum()) for i in wanted) if wanted else len(scores)
            hits += [rank < k for k in ks]
        return {f"image_R@{k}": float(h / max(1, len(queries))) for k, h in zip(ks, hits, strict=True)}

    def answers(self) -> dict[str, Answer]:
        from reir.evaluation.baseline_models import retrieval_text

        out: dict[str, Answer] = {}
        if self.retriever is not None:
            def two_stage(text: str, k: int, rescore: int = 0) -> list[Prediction]:
                query = self.two_encoder.encode_queries([text])[0]
                scores = self.vectors @ retrieval_text(self.retriever, query)
                return two_stage_rank(scores, self.gallery, self.grounder.ground(query), k, rescore=rescore)

            out["two_stage"] = two_stage
            out["two_stage_rescored"] = lambda text, k: two_stage(text, k, self.rescore_pool)
        out["rerank_scan"] = lambda text, k: rerank_scan_rank(
            self.gallery, self.scan.ground(self.encoder.encode_queries([text])[0]), k)
        out["rerank_scan_cached"] = lambda text, k: rerank_scan_rank(
            self.gallery, self.cached_scan.ground(self.encoder.encode_queries([text])[0]), k)
        return out


def gallery_image_vectors(retriever_dir: Path, samples: Sequence[ImageSample], gallery: InstanceGallery,
                          *, batch_size: int) -> tuple[np.ndarray, float]:  # fmt: skip
    """The image retriever's vector of every gallery image (in ``gallery.image_ids`` order) and
    the seconds it took: computed once, offline, as an image index would be."""
    from reir.evaluation.baseline_models import encode_image_vectors
    from reir.platform.modeling import load_reir_model

    model, processor = load_reir_model(str(retriever_dir))
    started = time.perf_counter()
    by_id = {s.image_id: s for s in samples}
    vectors = encode_image_vectors(model, processor, [by_id[i] for i in gallery.image_ids], batch_size=batch_size)
    return np.stack([vectors[i] for i in gallery.image_ids]), time.perf_counter() - started


def measure(answer: Answer, queries: Sequence[Query], top_k: int = max(BASELINE_KS), *,
            heldout: Mapping[str, Collection[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Answer every query in turn; BR@k at 0.5 and seconds per query, and BR@k per slice
    (``"slices"``) when the queries carry phrasing families or scene regimes."""
    answer(queries[0].text, top_k)  # warm-up (lazy calibration, first-call allocations), not timed
    started = time.perf_counter()
    predictions = {q.query_id: answer(q.text, top_k) for q in queries}
    seconds = time.perf_counter() - started
    out: dict[str, Any] = system_summary(predictions, {q.query_id: q for q in queries}, seconds)
    if has_slices(queries):
        out["slices"] = evaluate_slices(predictions, queries, heldout=heldout)
    return out


HELDOUT_GROUPS = ("in_family", "heldout_family", "in_regime", "heldout_regime")


def heldout_table(systems: Mapping[str, Mapping[str, Any] | None]) -> str:
    """Markdown: BR@1 / BR@10 (%) of each system on the in-family and held-out phrasing
    families and scene regimes (empty when no system has those slices)."""
    rows = {n: m["slices"] for n, m in systems.items() if m and m.get("slices")}
    groups = [g for g in HELDOUT_GROUPS if any(g in sl for sl in rows.values())]
    if not groups:
        return ""
    lines = ["| system | " + " | ".join(f"{g} BR@1 / @10" for g in groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for name, sl in rows.items():
        cells = [f"{100 * sl[g]['BR@1@0.5']:.1f} / {100 * sl[g]['BR@10@0.5']:.1f} ({int(sl[g]['queries'])})"
                 if g in sl else "-" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reir_variants(cfg: QualityConfig, *, ann: bool = True) -> dict[str, dict[str, Any]]:
    """reir's systems in a comparison: ``{name: reir_answer keywords}``: ``reir`` (serving's
    pool), ``reir_ann`` (no re-rank; with ``ann``) and ``reir_pool{P}`` for each of ``cfg.pools``."""
    out: dict[str, dict[str, Any]] = {"reir": {"rerank": True}}
    if ann:
        out["reir_ann"] = {"rerank": False}
    out.update({f"reir_pool{p}": {"rerank": True, "pool": p} for p in cfg.pools})
    return {name: {**kw, "ann_min_rows": cfg.ann_min_rows} for name, kw in out.items()}


def _reir_systems(gallery: EncodedGallery, db_path: Path, queries: Sequence[Query],
                  variants: Mapping[str, Mapping[str, Any]], heldout: Mapping[str, Collection[str]],
                  threads: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    write_index(gallery, db_path)
    out = {}
    for name, kw in variants.items():
        answer, close = reir_answer(gallery.model_dir, db_path, threads=threads, **kw)
        try:
            out[name] = measure(answer, queries, heldout=heldout)
        finally:
            close()
    return out


def shares_weights(model_dir: Path, other_dir: Path) -> bool:
    """Whether two checkpoints hold the same weights apart from the image-retrieval head
    (the two-stage system then grounds with reir's own re-ranker over reir's own rows)."""
    from safetensors.torch import load_file

    from reir.model.modeling import WEIGHTS_NAME

    a, b = (load_file(str(Path(d) / WEIGHTS_NAME)) for d in (model_dir, other_dir))
    b = {k: v for k, v in b.items() if not k.startswith("image_retrieval.")}
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _baselines(cfg: QualityConfig, samples: Sequence[ImageSample], gallery: InstanceGallery, queries: Sequence[Query],
               heldout: Mapping[str, Collection[str]], setup: dict[str, Any]) -> dict[str, dict[str, Any]]:  # fmt: skip
    import torch

    retriever = image_retriever_dir(cfg)
    vectors = None
    if retriever is not None:
        vectors, seconds = gallery_image_vectors(retriever, samples, gallery, batch_size=cfg.batch_size)
        setup.update(two_stage_model=str(retriever), image_vectors_encode_seconds=round(seconds, 2),
                     two_stage_shares_reir_weights=shares_weights(cfg.model_dir, retriever))
    torch.set_num_threads(cfg.threads)
    systems = BaselineSystems(cfg.model_dir, gallery, retriever_dir=retriever, image_vectors=vectors,
                              rescore_pool=cfg.rescore_pool)  # fmt: skip
    setup["image_vectors"] = vectors
    if retriever is not None:
        setup["two_stage_image_recall"] = systems.image_recall(queries)
    return {name: measure(answer, queries, heldout=heldout) for name, answer in systems.answers().items()}


def run_comparison(cfg: QualityConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``{"reir", "reir_ann", ["two_stage", "two_stage_rescored",] "rerank_scan", "weak", "setup"
    [, "scale"]}``: the two-stage rows with an image-retriever checkpoint, ``weak`` None without
    ``cfg.weak_model_dir``, ``scale`` with ``cfg.scale_images``. Also echoes the markdown tables."""
    samples = load_samples(cfg.data_root, "test")
    if not samples:
        raise ValueError(f"{cfg.data_root}: no test images")
    queries = select_queries(test_queries(cfg.data_root), cfg.max_queries, cfg.seed)
    if not queries:
        raise ValueError(f"{cfg.data_root}: no test queries in reircoco.json")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    encoded = encode_gallery(cfg.model_dir, samples, top_k=cfg.top_k_instances, batch_size=cfg.batch_size)
    echo(f"gallery: {encoded.images} images encoded in {encoded.seconds:.1f}s ({encoded.failures} failed); "
         f"{len(queries)} queries")  # fmt: skip
    heldout = read_heldout(cfg.data_root)
    systems = _reir_systems(encoded, cfg.work_dir / "reir.db", queries, reir_variants(cfg), heldout, cfg.threads)
    gallery = encoded.instance_gallery()
    setup: dict[str, Any] = {"gallery_images": encoded.images, "gallery_instances": len(gallery.boxes),
                             "gallery_encode_seconds": round(encoded.seconds, 2), "num_queries": len(queries),
                             "threads": cfg.threads, "rescore_pool": cfg.rescore_pool, "model": str(cfg.model_dir),
                             "weak_model": str(cfg.weak_model_dir) if cfg.weak_model_dir else None}  # fmt: skip
    systems.update(_baselines(cfg, samples, gallery, queries, heldout, setup))
    vectors = setup.pop("image_vectors")
    weak: dict[str, Any] | None = None
    if cfg.weak_model_dir is not None:
        weak_encoded = encode_gallery(cfg.weak_model_dir, samples, top_k=cfg.top_k_instances,
                                      batch_size=cfg.batch_size)  # fmt: skip
        weak = _reir_systems(weak_encoded, cfg.work_dir / "weak.db", queries, {"weak": reir_variants(cfg)["reir"]},
                             heldout, cfg.threads)["weak"]  # fmt: skip
        systems["weak"] = weak
    echo(comparison_table(systems))
    if heldout_table(systems):
        echo("In-family vs held-out (phrasing families and scene regimes never trained on):")
        echo(heldout_table(systems))
    out: dict[str, Any] = {**{k: v for k, v in systems.items() if k != "weak"}, "weak": weak, "setup": setup}
    if cfg.scale_images > 0:
        from reir.evaluation.scale import scale_costs

        out["scale"] = scale_costs(cfg, encoded, vectors, queries, echo=echo)
    return out
