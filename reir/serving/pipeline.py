"""The query path as stages, independent of where each stage runs.

``QueryPipeline.run(request)``: encode the text -> the searcher stage (:class:`Ranker`: ANN
top-N candidates under the request's structured filters, then, when asked and the model can,
the keyed context of the top ``rerank_candidates`` and their re-rank, in one place) -> answer
-> localize (when ``localize_results`` > 0: the first
``localize_results`` answers' small boxes are refined by zooming, see
:mod:`reir.serving.localize`; a failed localize stage keeps the stored boxes). ``mode="rank"``: the best ``top_k`` (image, box) pairs, near
duplicates of a kept box dropped. ``mode="discover"``: every image with a candidate
whose probability reaches the calibrated threshold, one answer (its best box) per image,
possibly none. Stages are injected (:class:`QueryStages`): Serve handles in
:mod:`reir.serving.app`, plain objects in :class:`LocalStages`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np

from reir.model.boxes import iou_xywh
from reir.platform.config import ServeConfig
from reir.platform.filters import Condition, StructuredFilter
from reir.platform.memory_index import AnnSpec
from reir.platform.modeling import ModelLoader, load_reir_model, model_version_for
from reir.platform.store import Hit, hit_columns, hits_from_columns
from reir.serving.localize import UNAVAILABLE, BoxUpdate, Localizer
from reir.serving.rerank import Reranker, Scored, ann_order
from reir.serving.retriever import Calibration, EncodedQuery, QueryEncoder, Result

log = logging.getLogger(__name__)

Mode = Literal["rank", "discover"]
# "search" is the whole searcher stage as the pipeline waits for it; inside it, "ann" (the
# vector search), "context" (the keyed fetch of the re-rank head's image rows) and "rerank".
STAGES = ("encode", "search", "ann", "context", "rerank", "localize", "total")


@dataclass(frozen=True)
class Candidates:
    """ANN hits (best first) and, when the head was re-ranked, its scored instances (best first)."""

    hits: list[Hit]
    scored: Sequence[Scored] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def __reduce__(self) -> tuple[Any, ...]:
        # By column across a Ray hop (reir.platform.store.hit_columns): the searcher hands back
        # the ANN hits and every re-ranked instance of the head, ~600 hits a query. The answer
        # needs boxes and scores only: the context's vectors (~500 x dim floats) stay behind.
        scored = None if self.scored is None else (hit_columns([h for h, _ in self.scored], vectors=False),
                                                   [p for _, p in self.scored])  # fmt: skip
        return (_candidates, (hit_columns(self.hits), scored, self.timings_s))


def _candidates(hits: Sequence[Sequence[Any]], scored: tuple[Sequence[Sequence[Any]], list[float]] | None,
                timings_s: dict[str, float]) -> Candidates:  # fmt: skip
    pairs = None if scored is None else list(zip(hits_from_columns(scored[0]), scored[1], strict=True))
    return Candidates(hits_from_columns(hits), pairs, timings_s)


def rerank_head(hits: Sequence[Hit], size: int) -> list[Hit]:
    """The candidates the re-ranker sees: the ``size`` best by ANN score (pk breaks ties)."""
    return sorted(hits, key=lambda h: (-h.score, h.pk))[:size]


class Ranker:
    """The searcher stage: one ANN search, then (``head`` > 0 and a re-ranker that can) one keyed
    fetch of the head's images and the re-rank, all where the store is. The context (every
    instance of the head's images, with vectors: the bulk of a query's data) never leaves this
    process, and a query makes two hops (encoder, searcher) instead of three."""

    def __init__(self, store: ContextStore, reranker: Reranker | None) -> None:
        self.store = store
        self.reranker = reranker

    @property
    def can_rerank(self) -> bool:
        return self.reranker is not None and self.reranker.can_rerank

    def rank(self, query: EncodedQuery, top_n: int, flt: StructuredFilter, head: int,
             presence: bool = False) -> Candidates:  # fmt: skip
        clock = time.perf_counter
        t = clock()
        hits = self.store.search(np.atleast_2d(query.embedding), top_n, flt)[0]
        timings = {"ann": clock() - t}
        if head <= 0 or not hits or self.reranker is None or not self.reranker.can_rerank:
            return Candidates(hits, None, timings)
        best = rerank_head(hits, head)
        t = clock()
        # The in-memory index hands the context over as arrays (no object per row); else by image.
        arrays = getattr(self.store, "context_arrays", None)
        context = arrays(best, model_version=flt.model_version) if arrays is not None else None
        if context is None:
            context = self.store.context(best, model_version=flt.model_version)
        timings["context"] = clock() - t
        t = clock()
        # The scored rows keep their vectors here; they do not cross the hop back (Candidates).
        scored = self.reranker.rerank(query, best, context, presence=presence)
        timings["rerank"] = clock() - t
        return Candidates(hits, scored, timings)


@dataclass(frozen=True)
class QueryRequest:
    query: str
    top_k: int = 10
    mode: Mode = "rank"
    rerank: bool = True
    conditions: tuple[Condition, ...] = ()
    offset: int = 0  # results skipped: the page starts here (discover mode's long answers come in pages)


@dataclass(frozen=True)
class QueryOutcome:
    results: list[Result]
    model_version: str
    mode: Mode = "rank"
    reranked: bool = False
    threshold: float | None = None
    gate: float | None = None  # discover mode: the query-level gate applied
    candidates: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    truncated: bool = False  # the query had more tokens than the text tower reads; its end was ignored
    total: int | None = None  # discover mode: every image found above the threshold, all pages together
    next_offset: int | None = None  # the next page's offset; None: this page is the last


class QueryStages(Protocol):
    async def info(self) -> dict[str, Any]:
        """``model_version``, ``calibration`` (dict), ``discover_threshold``, ``discover_gate``
        (0 when absent), ``can_rerank``."""
        ...

    async def encode(self, text: str) -> EncodedQuery:
        """The query encoded once; its token states travel on to the re-ranker."""
        ...

    async def candidates(self, query: EncodedQuery, top_n: int, flt: StructuredFilter, head: int,
                         presence: bool = False) -> Candidates:  # fmt: skip
        """ANN top-N under the filter; the best ``head`` re-ranked (0: no re-rank), see :class:`Ranker`
        (``presence``: by discover mode's presence head)."""
        ...

    async def search(self, text: str, top_n: int, flt: StructuredFilter, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:  # fmt: skip
        """:meth:`encode` then :meth:`candidates`, in one call where one place does both;
        ``Candidates.timings_s["encode"]`` says what the encoding took."""
        ...

    async def localize(self, query: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> list[BoxUpdate]:
        """One :class:`BoxUpdate` per ``(uri, box)``, in order."""
        ...

    async def health(self) -> dict[str, Any]: ...


class StageMetrics(Protocol):
    def observe(self, timings_s: Mapping[str, float], candidates: int) -> None: ...

    def count_localize_errors(self, reason: str, count: int) -> None: ...

    def count_truncated(self) -> None: ...


class NoStageMetrics:
    def observe(self, timings_s: Mapping[str, float], candidates: int) -> None:
        return None

    def count_localize_errors(self, reason: str, count: int) -> None:
        return None

    def count_truncated(self) -> None:
        return None


def report_truncation(query: EncodedQuery, metrics: StageMetrics) -> bool:
    """Warn (once per query) and count a query the text tower read only in part: without it a
    long query silently loses its end (often the relation that picks the instance)."""
    if not query.truncated:
        return False
    log.warning("query truncated: %d tokens, the model reads %d (text.max_length); the rest is ignored: %.80r",
                query.tokens, query.token_limit, query.text)
    metrics.count_truncated()
    return True


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p / (1.0 - p))


def _result(hit: Hit, prob: float) -> Result:
    return Result(image_id=hit.image_id, uri=hit.uri, box=hit.box, score=float(prob), logit=_logit(prob),
                  ann_score=hit.score, instance_score=hit.instance_score, pk=hit.pk)


def answer(scored: Sequence[Scored], *, mode: Mode, top_k: int, threshold: float, dedupe_iou: float,
           gate: float = 0.0) -> list[Result]:
    """Scored candidates (best first) -> the response's results for ``mode``. Discover mode answers
    every image whose best candidate reaches ``threshold``, and nothing when no candidate reaches
    ``gate`` (the query-level "is it anywhere?", calibrated apart from the per-image threshold)."""
    if mode == "discover":
        if not any(prob >= gate for _, prob in scored):
            return []
        best: dict[str, Scored] = {}
        for hit, prob in scored:
            if prob >= threshold and (hit.image_id not in best or prob > best[hit.image_id][1]):
                best[hit.image_id] = (hit, prob)
        ordered = sorted(best.values(), key=lambda s: (-s[1], s[0].pk))
        return [_result(h, p) for h, p in ordered]
    kept: list[Result] = []
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for hit, prob in scored:
        same_image = boxes.setdefault(hit.image_id, [])
        if any(iou_xywh(hit.box, b) >= dedupe_iou for b in same_image):
            continue
        same_image.append(hit.box)
        kept.append(_result(hit, prob))
        if len(kept) >= top_k:
            break
    return kept


class QueryPipeline:
    def __init__(
        self,
        stages: QueryStages,
        *,
        candidates: int = 100,
        rerank_candidates: int = 100,
        dedupe_iou: float = 0.9,
        filter_model_version: bool = True,
        metrics: StageMetrics | None = None,
        localize_results: int = 0,
        discover_candidates: int | None = None,
        discover_rerank_candidates: int | None = None,
    ) -> None:
        self.stages = stages
        # Discover mode's pools (default: rank mode's): every image holding the object, not a top-k.
        self.discover_candidates = discover_candidates or candidates
        self.discover_rerank_candidates = discover_rerank_candidates or rerank_candidates
        self.localize_results = localize_results
        self.candidates = candidates
        self.rerank_candidates = rerank_candidates
        self.dedupe_iou = dedupe_iou
        self.filter_model_version = filter_model_version
        self.metrics = metrics or NoStageMetrics()
        self._info: dict[str, Any] | None = None

    async def info(self) -> dict[str, Any]:
        if self._info is None:  # fixed for the life of the loaded model
            self._info = dict(await self.stages.info())
        return self._info

    async def run(self, request: QueryRequest) -> QueryOutcome:
        clock = time.perf_counter
        start = clock()
        info = await self.info()
        timings: dict[str, float] = {}
        version = info["model_version"] if self.filter_model_version else None
        flt = StructuredFilter(model_version=version or None, conditions=request.conditions)
        discover = request.mode == "discover"
        end = request.offset + request.top_k
        # Rank mode: the pool holds at least the page's end. Discover mode: its own pool, whatever
        # the page (every page of one answer slices the same list).
        pool = self.discover_candidates if discover else max(self.candidates, end)
        head_size = self.discover_rerank_candidates if discover else max(self.rerank_candidates, end)
        head_size = head_size if request.rerank and info.get("can_rerank") else 0
        t = clock()
        encoded, found = await self.stages.search(request.query, pool, flt, head_size, presence=discover)
        truncated = report_truncation(encoded, self.metrics)
        hits = found.hits
        timings.update(found.timings_s)
        # "search": the searcher stage as the pipeline waited for it, the encoding apart
        timings["search"] = max(0.0, clock() - t - timings.get("encode", 0.0))
        reranked = found.scored is not None
        scored = found.scored if found.scored is not None else ann_order(hits, Calibration(**info["calibration"]))
        threshold = float(info["discover_threshold"])
        gate = float(info.get("discover_gate", 0.0))
        found = answer(scored, mode=request.mode, top_k=end, threshold=threshold, dedupe_iou=self.dedupe_iou,
                       gate=gate)
        # Rank mode stops at the page's end; discover mode found every image above the threshold.
        total = len(found) if discover else None
        more = len(found) > end if discover else len(found) == end and len(scored) > end
        results = found[request.offset : end]
        if self.localize_results > 0 and results:
            t = clock()
            results = await self._localize(request.query, results)
            timings["localize"] = clock() - t
        timings["total"] = clock() - start
        self.metrics.observe(timings, len(hits))
        return QueryOutcome(
            results=results, model_version=info["model_version"], mode=request.mode, reranked=reranked,
            threshold=threshold if request.mode == "discover" else None,
            gate=gate if request.mode == "discover" else None, candidates=len(hits),
            timings_ms={k: round(v * 1000.0, 3) for k, v in timings.items()}, truncated=truncated,
            total=total, next_offset=end if more else None,
        )  # fmt: skip

    async def _localize(self, query: str, results: list[Result]) -> list[Result]:
        """Refined boxes for the first ``localize_results`` results; errors keep the stored box."""
        head = results[: self.localize_results]
        try:
            updates = await self.stages.localize(query, [(r.uri, r.box) for r in head])
            if len(updates) != len(head):
                raise ValueError(f"localize answered {len(updates)} boxes for {len(head)}")
        except Exception:  # a query is answered with the stored boxes rather than failed
            log.exception("localize stage failed; answering with the stored boxes")
            self.metrics.count_localize_errors(UNAVAILABLE, len(head))
            return results
        errors: dict[str, int] = {}
        for update in updates:
            if update.error:
                errors[update.error] = errors.get(update.error, 0) + 1
        for reason, count in sorted(errors.items()):
            self.metrics.count_localize_errors(reason, count)
        refined = [replace(r, box=u.box, refined=True) if u.refined else r for r, u in zip(head, updates, strict=True)]
        return refined + results[len(head):]

    async def health(self) -> dict[str, Any]:
        return await self.stages.health()

    async def image_uri(self, image_id: str) -> str | None:
        lookup = getattr(self.stages, "image_uri", None)
        return None if lookup is None else await lookup(image_id)


def encode_and_rank(encoder: QueryEncoder, ranker: Ranker, text: str, top_n: int, flt: StructuredFilter,
                    head: int, presence: bool = False) -> tuple[EncodedQuery, Candidates]:  # fmt: skip
    """One query through the encoder and the searcher stage in this process (the encoding's
    time in ``timings_s["encode"]``); the token states stay here, the rest travels on."""
    t = time.perf_counter()
    encoded = encoder.encode_queries([text])[0]
    took = time.perf_counter() - t
    found = ranker.rank(encoded, top_n, flt, head, presence)
    return replace(encoded, token_states=None, attention_mask=None), replace(
        found, timings_s={"encode": took, **found.timings_s})


class ContextStore(Protocol):
    def search(self, vectors: np.ndarray, top_n: int, filter: Any = None) -> list[list[Hit]]: ...

    def context(self, hits: Sequence[Hit], *, model_version: str | None = None) -> dict[str, list[Hit]]: ...

    def rows_for_images(
        self, image_ids: Sequence[str], *, model_version: str | None = None, with_vectors: bool = True,
        max_per_image: int = 64,
    ) -> dict[str, list[Hit]]: ...


class LocalStages:
    """:class:`QueryStages` over plain objects in this process (tests, benchmarks, notebooks)."""

    def __init__(self, encoder: QueryEncoder, store: ContextStore, reranker: Reranker, *,
                 discover_threshold: float, discover_gate: float = 0.0, localizer: Localizer | None = None) -> None:
        self.encoder = encoder
        self.store = store
        self.reranker = reranker
        self.ranker = Ranker(store, reranker)
        self.discover_threshold = discover_threshold
        self.discover_gate = discover_gate
        self.localizer = localizer

    async def info(self) -> dict[str, Any]:
        return {"model_version": self.encoder.model_version, "calibration": self.encoder.calibration.to_dict(),
                "discover_threshold": self.discover_threshold, "discover_gate": self.discover_gate,
                "can_rerank": self.reranker.can_rerank}

    async def encode(self, text: str) -> EncodedQuery:
        return self.encoder.encode_queries([text])[0]

    async def candidates(self, query: EncodedQuery, top_n: int, flt: StructuredFilter, head: int,
                         presence: bool = False) -> Candidates:  # fmt: skip
        return await asyncio.to_thread(self.ranker.rank, query, top_n, flt, head, presence)

    async def search(self, text: str, top_n: int, flt: StructuredFilter, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:  # fmt: skip
        return await asyncio.to_thread(encode_and_rank, self.encoder, self.ranker, text, top_n, flt, head, presence)

    async def localize(self, query: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> list[BoxUpdate]:
        if self.localizer is None:
            return [BoxUpdate(box) for _, box in items]
        return await asyncio.to_thread(self.localizer.localize, query, items)

    async def image_uri(self, image_id: str) -> str | None:
        rows = self.store.rows_for_images([image_id], with_vectors=False, max_per_image=1).get(image_id)
        return rows[0].uri if rows else None

    async def health(self) -> dict[str, Any]:
        return {"model_version": self.encoder.model_version}


def local_pipeline(
    cfg: ServeConfig, *, loader: ModelLoader = load_reir_model, discover_threshold: float | None = None,
    store: ContextStore | None = None, discover_gate: float | None = None,
) -> QueryPipeline:
    """The whole query path (encode, ANN, re-rank, discover) in this process, from a ServeConfig.

    For evaluation and notebooks: ``asyncio.run(local_pipeline(cfg).run(QueryRequest(...)))``
    gives the same answers as the Serve app without Ray. Close ``.stages.store`` when done.
    ``discover_threshold`` and ``discover_gate`` replace the calibrated ones (evaluation sweeps
    them from 0).
    ``store`` replaces the Milvus store of ``cfg.milvus`` (an in-memory index in benchmarks).
    """
    import torch

    from reir.platform.store import MilvusStore
    from reir.serving.rerank import discover_gate_for, discover_threshold_for

    # One query's forwards are too small to split across cores: with torch's default (every
    # core) they wait on each other and on the Milvus server beside them (2 cores: encode
    # 82 ms p50 in process vs 3 ms on one thread). The Serve replicas set the same per CPU.
    torch.set_num_threads(max(1, int(cfg.num_cpus_encoder)))
    model, processor = loader(cfg.model_path)
    encoder = QueryEncoder(model, processor, model_version=model_version_for(cfg.model_path))
    if store is None:
        milvus = MilvusStore.from_config(cfg.milvus)
        milvus.load()
        # The exact in-memory index (ServeConfig.memory_index), loaded before the first query
        # here: evaluation and benchmarks measure the path a warm searcher replica takes.
        milvus.use_memory_index(cfg.memory_index, cfg.memory_index_max_rows, wait=True,
                                model_version=encoder.model_version if cfg.filter_model_version else None,
                                ann=AnnSpec(min_rows=cfg.memory_index_ann_min_rows, recall=cfg.memory_index_recall))
        store = milvus
    reranker = Reranker(model, processor, calibration=encoder.calibration, max_instances=cfg.rerank_max_instances)
    localizer = Localizer.from_config(model, processor, cfg.localize) if cfg.localize.enabled else None
    stages = LocalStages(encoder, store, reranker, localizer=localizer,
                         discover_threshold=discover_threshold if discover_threshold is not None
                         else discover_threshold_for(cfg.model_path, cfg.discover_threshold),
                         discover_gate=discover_gate if discover_gate is not None else discover_gate_for(cfg.model_path))
    return QueryPipeline(stages, candidates=cfg.candidates, rerank_candidates=cfg.rerank_candidates,
                         dedupe_iou=cfg.dedupe_iou, filter_model_version=cfg.filter_model_version,
                         localize_results=localize_results_for(cfg), discover_candidates=cfg.discover_candidates,
                         discover_rerank_candidates=cfg.discover_rerank_candidates)


def localize_results_for(cfg: ServeConfig) -> int:
    """How many of the top results the localize stage sees (0: the stage is off)."""
    return cfg.localize.max_results if cfg.localize.enabled else 0
