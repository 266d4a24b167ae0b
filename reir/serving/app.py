"""Ray Serve application: thin deployments around the plain serving classes.

Graph: ``IngressDeployment`` (FastAPI, :mod:`reir.serving.http`) ->
``QueryEncoderDeployment`` (model, ``@serve.batch`` so concurrent queries share one
forward pass) -> ``SearcherDeployment`` (Milvus store + ranking, no model: the
encoder hands over the model's score calibration, see :mod:`reir.serving.retriever`).
The encoder and the searcher scale independently.

Entry point: ``serve run reir.serving.app:build_app model_path=DIR milvus_uri=URI``
(keys: any :class:`ServeConfig` field, ``milvus_<field>`` for Milvus settings, and
``config=FILE.yaml``). A milvus-lite ``.db`` file can be opened by one process, so
with a file URI keep one searcher replica (validated), or serve the data with
``EmbeddedMilvus`` / ``milvus-lite server`` and pass its ``http://`` URI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from reir.platform import telemetry as T
from reir.platform.config import MilvusConfig, ServeConfig, load_config
from reir.platform.modeling import ModelLoader, load_reir_model, model_version_for
from reir.platform.store import MilvusStore
from reir.serving.http import SearchOutcome, create_http_app
from reir.serving.retriever import Calibration, QueryEncoder, Result, Searcher


@serve.deployment(name="QueryEncoder")
class QueryEncoderDeployment:
    def __init__(
        self,
        model_path: str,
        *,
        loader: ModelLoader = load_reir_model,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
        torch_threads: int = 1,
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
        }
        self._batch_size = T.ray_metric(T.QUERY_ENCODE_BATCH_SIZE, boundaries=(1, 2, 4, 8, 16, 32, 64, 128))

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        self._batch_size.observe(len(texts))
        # Off the event loop, so health checks and the batch queue stay responsive.
        embeddings = await asyncio.to_thread(self.encoder.encode, texts)
        return list(embeddings)

    def check_health(self) -> None:
        if self.encoder.model is None:
            raise RuntimeError("text encoder has no model")


@serve.deployment(name="Searcher")
class SearcherDeployment:
    def __init__(self, milvus: Mapping[str, Any], *, candidates: int = 100, dedupe_iou: float = 0.9) -> None:
        cfg = MilvusConfig.model_validate(dict(milvus))
        self.store = MilvusStore.from_config(cfg)
        if not self.store.exists():
            self.store.close()
            raise RuntimeError(f"collection {cfg.collection!r} not found at {cfg.uri}; run ingestion first")
        self.store.load()
        self.searcher = Searcher(self.store, candidates=candidates, dedupe_iou=dedupe_iou)
        self._latency = T.ray_metric(T.QUERY_SEARCH_LATENCY_SECONDS)

    async def search(
        self, embedding: np.ndarray, top_k: int, calibration: Mapping[str, Any], model_version: str | None
    ) -> list[Result]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        results = await asyncio.to_thread(
            self.searcher.search, np.atleast_2d(embedding), top_k, Calibration(**calibration), model_version
        )
        self._latency.observe(loop.time() - start)
        return results[0]

    async def ping(self) -> dict[str, Any]:
        exists = await asyncio.to_thread(self.store.exists)
        if not exists:
            raise RuntimeError("collection is gone")
        return {"collection": self.store.collection}

    def check_health(self) -> None:
        if not self.store.exists():
            raise RuntimeError(f"collection {self.store.collection!r} not found")


class HandleBackend:
    """:class:`reir.serving.http.SearchBackend` over the encoder and searcher handles."""

    def __init__(self, encoder: DeploymentHandle, searcher: DeploymentHandle, *, filter_model_version: bool) -> None:
        self.encoder = encoder
        self.searcher = searcher
        self.filter_model_version = filter_model_version
        self._info: dict[str, Any] | None = None

    async def info(self) -> dict[str, Any]:
        if self._info is None:  # immutable for the life of the encoder's model
            self._info = await self.encoder.info.remote()
        return self._info

    async def search(self, query: str, top_k: int) -> SearchOutcome:
        info = await self.info()
        embedding = await self.encoder.encode.remote(query)
        version = info["model_version"] if self.filter_model_version else None
        results = await self.searcher.search.remote(embedding, top_k, info["calibration"], version)
        return SearchOutcome(results=results, model_version=info["model_version"])

    async def health(self) -> dict[str, Any]:
        info = await self.info()
        await self.searcher.ping.remote()
        return {"model_version": info["model_version"]}


class RayRequestMetrics:
    """Request counter + latency histogram (``reir.platform.telemetry`` names)."""

    def __init__(self) -> None:
        self.requests = T.ray_metric(T.QUERY_REQUESTS_TOTAL)
        self.latency = T.ray_metric(T.QUERY_LATENCY_SECONDS)

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(
        self,
        encoder: DeploymentHandle,
        searcher: DeploymentHandle,
        *,
        max_top_k: int = 100,
        filter_model_version: bool = True,
    ) -> None:
        self.backend = HandleBackend(encoder, searcher, filter_model_version=filter_model_version)
        self.max_top_k = max_top_k

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built on the replica: the FastAPI app never has to be pickled.
        return create_http_app(self.backend, max_top_k=self.max_top_k, metrics=RayRequestMetrics())

    def check_health(self) -> None:
        return None  # stateless; dependencies have their own health checks


def app_for(cfg: ServeConfig, *, loader: ModelLoader = load_reir_model) -> Application:
    """The bound application for ``cfg``; ``loader`` lets tests inject a model."""
    # @serve.deployment turns the classes into Deployments (mypy sees the plain classes).
    encoder = QueryEncoderDeployment.options(  # type: ignore[attr-defined]
        num_replicas=cfg.encoder_replicas, ray_actor_options={"num_cpus": cfg.num_cpus_encoder}
    ).bind(
        cfg.model_path,
        loader=loader,
        max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        torch_threads=max(1, int(cfg.num_cpus_encoder)),
    )
    searcher = SearcherDeployment.options(  # type: ignore[attr-defined]
        num_replicas=cfg.searcher_replicas, ray_actor_options={"num_cpus": cfg.num_cpus_searcher}
    ).bind(cfg.milvus.model_dump(), candidates=cfg.candidates, dedupe_iou=cfg.dedupe_iou)
    return IngressDeployment.options(  # type: ignore[attr-defined]
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.num_cpus_ingress}
    ).bind(encoder, searcher, max_top_k=cfg.max_top_k, filter_model_version=cfg.filter_model_version)


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
    return load_config(ServeConfig, yaml_path, overrides)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run reir.serving.app:build_app key=value ...``."""
    return app_for(serve_config_from_args(args))


def run_app(cfg: ServeConfig, *, loader: ModelLoader = load_reir_model, blocking: bool = False) -> DeploymentHandle:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(app_for(cfg, loader=loader), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
