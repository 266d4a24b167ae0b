"""Ray Serve application: thin deployments around the plain serving classes.

Graph: ``IngressDeployment`` (FastAPI, :mod:`reir.serving.http`, runs the
:class:`~reir.serving.pipeline.QueryPipeline`) -> ``QueryEncoderDeployment`` (model,
``@serve.batch`` so concurrent queries share one forward pass) -> ``SearcherDeployment``
(:class:`~reir.serving.pipeline.Ranker`: Milvus ANN top-N with filters, or the exact in-memory
index of ``ServeConfig.memory_index`` for unfiltered searches, and, in the same
call, the keyed fetch of the re-rank head's image rows and the re-rank itself, with the
query's token states from the encoder, so two hops per query, no second text forward, and
the context rows never leave the replica; also the localize stage,
:mod:`reir.serving.localize`, when ``ServeConfig.localize.enabled``). Each deployment has
its own replica count or autoscaling spec (``ServeConfig.autoscaling``).

Entry point: ``serve run reir.serving.app:build_app model_path=DIR milvus_uri=URI``
(keys: any :class:`ServeConfig` field, ``milvus_<field>`` for Milvus settings, and
``config=FILE.yaml``). A milvus-lite ``.db`` file can be opened by one process, so
with a file URI keep one searcher replica (validated), or serve the data with
``EmbeddedMilvus`` / ``milvus-lite server`` and pass its ``http://`` URI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from reir.errors import DependencyUnavailable
from reir.platform import telemetry as T
from reir.platform.auth import KeyRing
from reir.platform.config import LocalizeConfig, MilvusConfig, ServeConfig, ServeStage, config_path, load_config
from reir.platform.filters import StructuredFilter
from reir.platform.memory_index import AnnSpec
from reir.platform.modeling import ModelLoader, load_reir_model, model_version_for
from reir.platform.store import MilvusStore
from reir.serving.failures import milvus_call, stage_call
from reir.serving.http import HttpSettings, create_http_app
from reir.serving.localize import BoxUpdate, Localizer
from reir.serving.pipeline import Candidates, QueryPipeline, Ranker, encode_and_rank, localize_results_for
from reir.serving.rerank import Reranker, discover_gate_for, discover_threshold_for
from reir.serving.retriever import EncodedQuery, QueryEncoder

ENCODE_BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128)


@serve.deployment(name="QueryEncoder")
class QueryEncoderDeployment:
    def __init__(
        self,
        model_path: str,
        *,
        loader: ModelLoader = load_reir_model,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.0,
        torch_threads: int = 1,
        discover_threshold: float = 0.5,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        model, processor = loader(model_path)
        self.encoder = QueryEncoder(model, processor, model_version=model_version_for(model_path))
        # @serve.batch wraps the method at runtime; its setters are invisible to type checkers.
        self.encode.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        # Probe once at startup so a model with an unexpected score fails/warns early.
        self._info = {
            "model_version": self.encoder.model_version,
            "dim": self.encoder.dim,
            "calibration": self.encoder.calibration.to_dict(),
            "discover_threshold": discover_threshold_for(model_path, discover_threshold),
            "discover_gate": discover_gate_for(model_path),
        }
        self._batch_size = T.ray_metric(T.QUERY_ENCODE_BATCH_SIZE, boundaries=ENCODE_BATCH_BOUNDARIES)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def encode(self, texts: list[str]) -> list[EncodedQuery]:
        self._batch_size.observe(len(texts))
        # Off the event loop, so health checks and the batch queue stay responsive.
        return await asyncio.to_thread(self.encoder.encode_queries, texts)

    def check_health(self) -> None:
        if self.encoder.model is None:
            raise RuntimeError("text encoder has no model")


class Searcher:
    """The searcher stage (:class:`reir.serving.pipeline.Ranker`): one ANN search, the keyed
    fetch of the re-rank head's images and their re-rank, in one replica, so the context rows
    (the bulk of a query's data) never cross a hop. It holds the model for the re-ranker (the
    query's token states arrive from the encoder: no second text forward) and the localize
    stage (:mod:`reir.serving.localize`, reads the gallery images from the rows' uris).

    A plain class: :data:`SearcherDeployment` serves it as its own deployment, and with
    ``ServeConfig.search_in_ingress`` the ingress replica holds one (:class:`InProcessStages`)."""

    def __init__(
        self, milvus: Mapping[str, Any], model_path: str, *, loader: ModelLoader = load_reir_model,
        torch_threads: int = 1, localize: Mapping[str, Any] | None = None, rerank_max_instances: int = 64,
        discover_threshold: float = 0.5, memory_index: str = "off", memory_index_max_rows: int = 5_000_000,
        memory_index_ann_min_rows: int = 200_000, memory_index_recall: float = 0.97, filter_model_version: bool = True,
    ) -> None:  # fmt: skip
        import torch

        cfg = MilvusConfig.model_validate(dict(milvus))
        self.store = MilvusStore.from_config(cfg)
        if not self.store.exists():
            self.store.close()
            raise RuntimeError(f"collection {cfg.collection!r} not found at {cfg.uri}; run ingestion first")
        self.store.load()
        torch.set_num_threads(max(1, torch_threads))
        model, processor = loader(model_path)
        self.encoder = QueryEncoder(model, processor, model_version=model_version_for(model_path))
        # The exact in-memory index (ServeConfig.memory_index): loaded in the background, so the
        # replica is ready at once and searches go to Milvus until it is.
        self._memory_rows_gauge = T.ray_metric(T.QUERY_MEMORY_INDEX_ROWS)
        self._memory_recall_gauge = T.ray_metric(T.QUERY_MEMORY_INDEX_RECALL)
        self._memory_rows = 0
        self._memory_rows_gauge.set(0)
        self.store.use_memory_index(
            memory_index, memory_index_max_rows, on_change=self._set_memory_rows,
            model_version=self.encoder.model_version if filter_model_version else None,
            ann=AnnSpec(min_rows=memory_index_ann_min_rows, recall=memory_index_recall),
        )  # fmt: skip
        calibration = self.encoder.calibration
        self.ranker = Ranker(self.store, Reranker(model, processor, calibration=calibration,
                                                  max_instances=rerank_max_instances))
        # What the ingress needs when this replica also encodes (ServeConfig.encode_in_searcher).
        self._info = {"model_version": self.encoder.model_version, "dim": self.encoder.dim,
                      "calibration": calibration.to_dict(),
                      "discover_threshold": discover_threshold_for(model_path, discover_threshold),
                      "discover_gate": discover_gate_for(model_path)}
        self.localizer = Localizer.from_config(model, processor, LocalizeConfig.model_validate(dict(localize or {})))
        self._latency = T.ray_metric(T.QUERY_SEARCH_LATENCY_SECONDS)
        # Queries it encodes itself (encode_in_searcher) are batches of one, on the same histogram.
        self._batch_size = T.ray_metric(T.QUERY_ENCODE_BATCH_SIZE, boundaries=ENCODE_BATCH_BOUNDARIES)

    def info(self) -> dict[str, Any]:
        return {**self._info, "can_rerank": self.ranker.can_rerank}

    async def search(self, text: str, top_n: int, flt: StructuredFilter, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:  # fmt: skip
        """The query encoded here, then :meth:`candidates` (``encode_in_searcher``: one hop per query)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        found = await asyncio.to_thread(milvus_call, encode_and_rank, self.encoder, self.ranker, text, top_n, flt, head,
                                        presence)  # fmt: skip
        self._latency.observe(loop.time() - start)
        self._batch_size.observe(1)
        return found

    async def candidates(self, query: EncodedQuery, top_n: int, flt: StructuredFilter, head: int,
                         presence: bool = False) -> Candidates:  # fmt: skip
        """ANN top-N for one encoded query under the (validated) filter; the best ``head``
        re-ranked with their images' context (one search, one keyed fetch, no extra hop)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        found = await asyncio.to_thread(milvus_call, self.ranker.rank, query, top_n, flt, head, presence)
        self._latency.observe(loop.time() - start)
        return found

    async def localize(self, query: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> list[BoxUpdate]:
        return await asyncio.to_thread(self.localizer.localize, query, items)

    async def image_uri(self, image_id: str) -> str | None:
        rows = await asyncio.to_thread(milvus_call, self.store.rows_for_images, [image_id], with_vectors=False,
                                       max_per_image=1)
        found = rows.get(image_id)
        return found[0].uri if found else None

    async def ping(self) -> dict[str, Any]:
        exists = await asyncio.to_thread(milvus_call, self.store.exists)
        if not exists:
            raise DependencyUnavailable(f"collection {self.store.collection!r} is gone", retry_after_s=5.0)
        return {"collection": self.store.collection}

    def _set_memory_rows(self, rows: int) -> None:
        self._memory_rows = rows
        self._memory_rows_gauge.set(rows)
        self._record_memory_recall()

    def _record_memory_recall(self) -> None:
        """The index's recall (1 for an exact scan, the live measure with lists); nothing while
        it is not loaded."""
        manager = self.store.memory_index
        recall = manager.recall() if manager is not None else None
        if recall is not None:
            self._memory_recall_gauge.set(recall)

    def check_health(self) -> None:
        # A gauge recorded once can drop out of Ray's metrics export while the replica lives on
        # (seen once in tests/ops: no series after the load); the health check, every 10 s,
        # records it again.
        self._memory_rows_gauge.set(self._memory_rows)
        self._record_memory_recall()
        if not self.store.exists():
            raise RuntimeError(f"collection {self.store.collection!r} not found")


SearcherDeployment = serve.deployment(name="Searcher")(Searcher)


class InProcessStages:
    """:class:`reir.serving.pipeline.QueryStages` over a :class:`Searcher` in this replica
    (``ServeConfig.search_in_ingress``): the whole query in the ingress process, no Ray hop."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    async def info(self) -> dict[str, Any]:
        return self.searcher.info()

    async def encode(self, text: str) -> EncodedQuery:
        raise RuntimeError("this app searches in the ingress: call search()")

    async def candidates(self, query: EncodedQuery, top_n: int, flt: StructuredFilter, head: int,
                         presence: bool = False) -> Candidates:  # fmt: skip
        return await self.searcher.candidates(query, top_n, flt, head, presence)

    async def search(self, text: str, top_n: int, flt: StructuredFilter, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:  # fmt: skip
        return await self.searcher.search(text, top_n, flt, head, presence)

    async def localize(self, query: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> list[BoxUpdate]:
        return await self.searcher.localize(query, items)

    async def image_uri(self, image_id: str) -> str | None:
        return await self.searcher.image_uri(image_id)

    async def health(self) -> dict[str, Any]:
        await self.searcher.ping()
        return {"model_version": self.searcher.info()["model_version"]}


class HandleStages:
    """:class:`reir.serving.pipeline.QueryStages` over the deployment handles (read-only
    stages, so a call whose replica died is retried once)."""

    def __init__(self, encoder: DeploymentHandle | None, searcher: DeploymentHandle) -> None:
        self.encoder = encoder  # None: the searcher encodes (ServeConfig.encode_in_searcher)
        self.searcher = searcher

    async def info(self) -> dict[str, Any]:
        searcher = await stage_call(lambda: self.searcher.info.remote(), "Searcher")
        if self.encoder is None:
            return searcher
        return {**(await stage_call(lambda: self.encoder.info.remote(), "QueryEncoder")), **searcher}

    async def encode(self, text: str) -> EncodedQuery:
        if self.encoder is None:
            raise RuntimeError("this app encodes in the searcher: call search()")
        return await stage_call(lambda: self.encoder.encode.remote(text), "QueryEncoder")

    async def candidates(self, query: EncodedQuery, top_n: int, flt: StructuredFilter, head: int,
                         presence: bool = False) -> Candidates:  # fmt: skip
        return await stage_call(lambda: self.searcher.candidates.remote(query, top_n, flt, head, presence), "Searcher")

    async def search(self, text: str, top_n: int, flt: StructuredFilter, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:  # fmt: skip
        if self.encoder is None:  # one hop
            return await stage_call(lambda: self.searcher.search.remote(text, top_n, flt, head, presence), "Searcher")
        t = time.perf_counter()
        encoded = await self.encode(text)
        took = time.perf_counter() - t
        found = await self.candidates(encoded, top_n, flt, head, presence)
        return encoded, replace(found, timings_s={"encode": took, **found.timings_s})

    async def localize(self, query: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> list[BoxUpdate]:
        return await stage_call(lambda: self.searcher.localize.remote(query, items), "Searcher")

    async def image_uri(self, image_id: str) -> str | None:
        return await stage_call(lambda: self.searcher.image_uri.remote(image_id), "Searcher")

    async def health(self) -> dict[str, Any]:
        stage = self.encoder if self.encoder is not None else self.searcher
        info = await stage_call(lambda: stage.info.remote(), "QueryEncoder" if self.encoder is not None else "Searcher")
        await stage_call(lambda: self.searcher.ping.remote(), "Searcher")
        return {"model_version": info["model_version"]}


class RayRequestMetrics:
    """Request counter + latency histogram (``reir.platform.telemetry`` names)."""

    def __init__(self) -> None:
        self.requests = T.ray_metric(T.QUERY_REQUESTS_TOTAL)
        self.latency = T.ray_metric(T.QUERY_LATENCY_SECONDS)

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


class RayStageMetrics:
    """Per-stage latency histogram (``stage`` tag), candidates per query, localize errors,
    truncated queries."""

    def __init__(self) -> None:
        self.stages = T.ray_metric(T.QUERY_STAGE_LATENCY_SECONDS)
        self.candidates = T.ray_metric(T.QUERY_CANDIDATES, boundaries=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000))
        self.localize_errors = T.ray_metric(T.QUERY_LOCALIZE_ERRORS_TOTAL)
        self.truncated = T.ray_metric(T.QUERY_TRUNCATED_TOTAL)

    def count_truncated(self) -> None:
        self.truncated.inc(1)

    def observe(self, timings_s: Mapping[str, float], candidates: int) -> None:
        for stage, seconds in timings_s.items():
            self.stages.observe(seconds, tags={"stage": stage})
        self.candidates.observe(candidates)

    def count_localize_errors(self, reason: str, count: int) -> None:
        self.localize_errors.inc(count, tags={"reason": reason})


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(
        self,
        encoder: DeploymentHandle | None,
        searcher: DeploymentHandle | None,
        *,
        config: Mapping[str, Any],
        in_process: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = ServeConfig.model_validate(dict(config))
        # search_in_ingress: this replica is the searcher too (in_process: Searcher's arguments).
        self.searcher = Searcher(**in_process) if in_process is not None else None
        if self.searcher is not None:
            stages: Any = InProcessStages(self.searcher)
        elif searcher is not None:
            stages = HandleStages(encoder, searcher)
        else:
            raise ValueError("the ingress needs a Searcher deployment handle or its in-process arguments")
        self.pipeline = QueryPipeline(
            stages, candidates=self.cfg.candidates,
            rerank_candidates=self.cfg.rerank_candidates, dedupe_iou=self.cfg.dedupe_iou,
            filter_model_version=self.cfg.filter_model_version, metrics=RayStageMetrics(),
            localize_results=localize_results_for(self.cfg), discover_candidates=self.cfg.discover_candidates,
            discover_rerank_candidates=self.cfg.discover_rerank_candidates,
        )  # fmt: skip
        # Keys (and the mounted secret file) are read here, on the replica; a rotation is a redeploy.
        self.keyring = KeyRing.from_config(self.cfg.security)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built on the replica: the FastAPI app never has to be pickled.
        return create_http_app(self.pipeline, settings=HttpSettings.from_config(self.cfg), keyring=self.keyring,
                               metrics=RayRequestMetrics())

    def check_health(self) -> None:
        if self.searcher is not None:  # search_in_ingress: the searcher's own check
            self.searcher.check_health()
        # otherwise stateless; the other deployments have their own health checks


def _scaling(cfg: ServeConfig, stage: ServeStage, replicas: int, cpus: float) -> dict[str, Any]:
    """Deployment options: autoscaling when the stage has a spec, else a fixed replica count."""
    ongoing = cfg.max_ongoing_requests * (2 if stage == "ingress" else 1)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus}, "max_ongoing_requests": ongoing}
    if cfg.replica_resources:
        options["ray_actor_options"]["resources"] = dict(cfg.replica_resources)
    spec = cfg.autoscaling.get(stage)
    if spec is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = spec.model_dump(exclude_none=True)
    return options


def app_for(cfg: ServeConfig, *, loader: ModelLoader = load_reir_model) -> Application:
    """The bound application for ``cfg``; ``loader`` lets tests inject a model."""
    searching = {
        "milvus": cfg.milvus.model_dump(), "model_path": cfg.model_path, "loader": loader,
        "torch_threads": max(1, int(cfg.num_cpus_searcher)), "localize": cfg.localize.model_dump(),
        "rerank_max_instances": cfg.rerank_max_instances, "discover_threshold": cfg.discover_threshold,
        "memory_index": cfg.memory_index, "memory_index_max_rows": cfg.memory_index_max_rows,
        "memory_index_ann_min_rows": cfg.memory_index_ann_min_rows, "memory_index_recall": cfg.memory_index_recall,
        "filter_model_version": cfg.filter_model_version,
    }  # fmt: skip
    if cfg.search_in_ingress:
        # One deployment does the whole query: it scales, and asks for resources, as the searcher.
        return IngressDeployment.options(  # type: ignore[attr-defined]
            **_scaling(cfg, "searcher", cfg.searcher_replicas, cfg.num_cpus_searcher)
        ).bind(None, None, config=cfg.model_dump(mode="json"), in_process=searching)
    # @serve.deployment turns the classes into Deployments (mypy sees the plain classes).
    encoder = None if cfg.encode_in_searcher else QueryEncoderDeployment.options(  # type: ignore[attr-defined]
        **_scaling(cfg, "encoder", cfg.encoder_replicas, cfg.num_cpus_encoder)
    ).bind(
        cfg.model_path,
        loader=loader,
        max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        torch_threads=max(1, int(cfg.num_cpus_encoder)),
        discover_threshold=cfg.discover_threshold,
    )
    searcher = SearcherDeployment.options(  # type: ignore[attr-defined]
        **_scaling(cfg, "searcher", cfg.searcher_replicas, cfg.num_cpus_searcher)
    ).bind(**searching)
    return IngressDeployment.options(  # type: ignore[attr-defined]
        **_scaling(cfg, "ingress", cfg.ingress_replicas, cfg.num_cpus_ingress)
    ).bind(encoder, searcher, config=cfg.model_dump(mode="json"))


def serve_config_from_args(args: Mapping[str, Any]) -> ServeConfig:
    """``serve run`` style flat args -> ServeConfig.

    ``milvus_uri`` -> ``milvus.uri``; a bare Milvus field (``collection``, ``uri``,
    ``token``, ``index_type``) that is not a ServeConfig field also goes to ``milvus``.
    """
    flat = dict(args)
    yaml_path = flat.pop("config", None)
    overrides: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("milvus_"):
            key = "milvus." + key[len("milvus_") :]
        elif key in MilvusConfig.model_fields and key not in ServeConfig.model_fields:
            key = "milvus." + key
        overrides[key.replace("__", ".")] = value
    # The same file and environment as every other command (reir.settings): --config or $REIR_CONFIG.
    return load_config(ServeConfig, config_path(yaml_path), overrides, section="serve")


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run reir.serving.app:build_app key=value ...``."""
    return app_for(serve_config_from_args(args))


def run_app(cfg: ServeConfig, *, loader: ModelLoader = load_reir_model, blocking: bool = False) -> DeploymentHandle:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app; returns once the
    app answers over HTTP (``reir.serving.lifecycle.wait_until_routed``)."""
    from reir.platform.raylocal import init_ray
    from reir.serving.lifecycle import local_base_url, wait_until_routed

    init_ray()  # RAY_ADDRESS or a local instance, never a dead cluster Ray's address file names
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    if blocking:
        return serve.run(app_for(cfg, loader=loader), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=True)
    handle = serve.run(app_for(cfg, loader=loader), name=cfg.app_name, route_prefix=cfg.route_prefix)
    wait_until_routed(local_base_url(cfg.host, cfg.port, cfg.route_prefix))
    return handle
