"""reir against its baselines on one test gallery, with the same stored instances for all.

The gallery is encoded once per checkpoint with ingestion's own :class:`InstanceEncoder`
(the code a Ray Data actor runs); its rows go into a milvus-lite file exactly as the Milvus
sink writes them, and reir answers through :func:`reir.serving.pipeline.local_pipeline` (the
Serve app's encode -> ANN -> re-rank path, in this process). The baselines
(:mod:`reir.evaluation.baselines`) rank the very same instance rows. Every system answers
every selected query one at a time; ``seconds_per_query`` is that wall time divided by the
number of queries (text encoding included for all of them; gallery encoding, done once and
offline, is reported apart).
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
    rec_scan_rank,
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
    max_queries: int | None = None  # a seeded sample of the test queries; the gallery stays whole
    seed: int = 0
    top_k_instances: int = 10  # instances stored per image, as `reir ingest` stores them
    batch_size: int = 16


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

        per_image: dict[str, list[tuple[list[float], np.ndarray]]] = {}
        for cols in self.ok_columns():
            for i, image_id in enumerate(cols[S.IMAGE_ID]):
                box = [float(cols[name][i]) for name in S.BOX_FIELDS]
                per_image.setdefault(str(image_id), []).append((box, np.asarray(cols[S.EMBEDDING][i])))
        return InstanceGallery.from_instances(per_image)


def encode_gallery(model_dir: Path, samples: Sequence[ImageSample], *, top_k: int, batch_size: int) -> EncodedGallery:
    """Every gallery image through ingestion's encoder (decode, detect, embed, rows)."""
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


def reir_answer(model_dir: Path, db_path: Path, *, rerank: bool) -> tuple[Answer, Callable[[], None]]:
    """reir's query path (encode -> ANN -> re-rank) in process; returns (answer, close)."""
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.pipeline import QueryRequest, local_pipeline

    pipeline = local_pipeline(ServeConfig(model_path=str(model_dir),
                                          milvus=MilvusConfig(uri=str(db_path), collection=COLLECTION)))  # fmt: skip
    loop = asyncio.new_event_loop()

    def answer(text: str, top_k: int) -> list[Prediction]:
        outcome = loop.run_until_complete(pipeline.run(QueryRequest(text, top_k=top_k, rerank=rerank)))
        return [Prediction(r.image_id, r.box, r.score) for r in outcome.results]

    def close() -> None:
        loop.close()
        pipeline.stages.store.close()  # type: ignore[attr-defined]

    return answer, close


def baseline_answers(model_dir: Path, gallery: InstanceGallery) -> dict[str, Answer]:
    """``two_stage`` and ``rec_scan`` over ``gallery`` with the checkpoint's text encoder and score."""
    from reir.platform.modeling import load_reir_model
    from reir.serving.retriever import QueryEncoder

    model, processor = load_reir_model(str(model_dir))
    encoder = QueryEncoder(model, processor)
    pooled = gallery.pooled()

    def score(text: np.ndarray, inst: np.ndarray) -> np.ndarray:
        return encoder.score(text[None, :], inst)[0]

    return {
        "two_stage": lambda text, k: two_stage_rank(encoder.encode([text])[0], gallery, pooled, score, k),
        "rec_scan": lambda text, k: rec_scan_rank(encoder.encode([text])[0], gallery, score, k),
    }


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


def _reir_systems(gallery: EncodedGallery, db_path: Path, queries: Sequence[Query],
                  names: dict[bool, str], heldout: Mapping[str, Collection[str]]) -> dict[str, dict[str, Any]]:  # fmt: skip
    write_index(gallery, db_path)
    out = {}
    for rerank, name in names.items():
        answer, close = reir_answer(gallery.model_dir, db_path, rerank=rerank)
        try:
            out[name] = measure(answer, queries, heldout=heldout)
        finally:
            close()
    return out


def run_comparison(cfg: QualityConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``{"reir", "reir_ann", "two_stage", "rec_scan", "weak", "setup"}``; ``weak`` is None
    without ``cfg.weak_model_dir``. Also echoes the markdown table."""
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
    systems = _reir_systems(encoded, cfg.work_dir / "reir.db", queries, {True: "reir", False: "reir_ann"}, heldout)
    gallery = encoded.instance_gallery()
    for name, answer in baseline_answers(cfg.model_dir, gallery).items():
        systems[name] = measure(answer, queries, heldout=heldout)
    weak: dict[str, Any] | None = None
    if cfg.weak_model_dir is not None:
        weak_encoded = encode_gallery(cfg.weak_model_dir, samples, top_k=cfg.top_k_instances,
                                      batch_size=cfg.batch_size)  # fmt: skip
        weak = _reir_systems(weak_encoded, cfg.work_dir / "weak.db", queries, {True: "weak"}, heldout)["weak"]
        systems["weak"] = weak
    echo(comparison_table(systems))
    if heldout_table(systems):
        echo("In-family vs held-out (phrasing families and scene regimes never trained on):")
        echo(heldout_table(systems))
    setup = {"gallery_images": encoded.images, "gallery_instances": len(gallery.boxes),
             "gallery_encode_seconds": round(encoded.seconds, 2), "num_queries": len(queries),
             "model": str(cfg.model_dir), "weak_model": str(cfg.weak_model_dir) if cfg.weak_model_dir else None}  # fmt: skip
    return {**{k: v for k, v in systems.items() if k != "weak"}, "weak": weak, "setup": setup}
