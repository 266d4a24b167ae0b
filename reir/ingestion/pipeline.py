"""Offline gallery ingestion: images -> instance embeddings -> Milvus, on Ray Data.

Plan: ``from_items(image_id, uri)`` -> ``map_batches(read_image_bytes)`` (tasks) ->
``map_batches(EncoderActor, ActorPoolStrategy(size=num_encoders))`` (model loaded
once per actor) -> ``write_datasink(MilvusDatasink)`` -> build index + load on the
driver.

Milvus-lite files: a ``.db`` path is a data directory locked by the one process that
opens it, but write tasks run in several worker processes. Rather than forcing a
single writer (which serializes writes and still conflicts with the driver building
the index), the pipeline starts :class:`EmbeddedMilvus` on that directory for the
run and everyone (driver, write tasks) talks to it over gRPC; the server is stopped
afterwards, so the ``.db`` path is again a plain file store for the next process. A
``http://`` URI is used as is.

CPU budget: Ray Data deadlocks when actors plus read/write tasks ask for more CPUs
than the cluster has, so every stage asks for a configurable fraction
(``num_cpus_per_encoder``, ``num_cpus_per_reader``, ``num_cpus_per_writer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from reir.ingestion.encoder import InstanceEncoder
from reir.ingestion.gallery import GalleryItem, list_gallery, read_image_bytes
from reir.ingestion.records import DeadLetter
from reir.ingestion.sink import MilvusDatasink
from reir.platform import telemetry as T
from reir.platform.config import IngestConfig, MilvusConfig
from reir.platform.milvus_server import EmbeddedMilvus
from reir.platform.modeling import ModelLoader, load_reir_model, model_version_for
from reir.platform.store import MilvusStore, SearchFilter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSummary:
    images: int
    instances: int
    failures: int
    seconds: float
    images_per_s: float
    model_version: str = ""
    rows_in_store: int = 0
    dead_letter: list[DeadLetter] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EncoderActor:
    """Ray Data actor: loads the model once, then encodes batches with InstanceEncoder."""

    def __init__(
        self,
        model_path: str,
        *,
        model_version: str,
        top_k: int,
        nms_iou: float = 0.7,
        loader: ModelLoader = load_reir_model,
        torch_threads: int = 1,
    ) -> None:
        import torch

        # Fractional-CPU actors on a small box must not each spawn a full thread pool.
        torch.set_num_threads(max(1, torch_threads))
        model, processor = loader(model_path)
        self.encoder = InstanceEncoder(
            model, processor, model_version=model_version, top_k=top_k, nms_iou=nms_iou
        )
        self._images = T.ray_metric(T.INGEST_IMAGES_TOTAL)
        self._instances = T.ray_metric(T.INGEST_INSTANCES_TOTAL)
        self._failures = T.ray_metric(T.INGEST_FAILURES_TOTAL)
        self._latency = T.ray_metric(T.INGEST_BATCH_LATENCY_SECONDS)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        enc = self.encoder
        before = (enc.images, enc.instances, enc.failures)
        start = time.perf_counter()
        out = enc.rows_for_batch(batch)
        self._latency.observe(time.perf_counter() - start)
        # Ray counters reject inc(0), hence the guards.
        if enc.images > before[0]:
            self._images.inc(enc.images - before[0])
        if enc.instances > before[1]:
            self._instances.inc(enc.instances - before[1])
        if enc.failures > before[2]:
            self._failures.inc(enc.failures - before[2], tags={"reason": "decode"})
        return out


@contextlib.contextmanager
def shared_milvus(cfg: MilvusConfig) -> Iterator[MilvusConfig]:
    """``cfg`` with a URI every process can open: a server for milvus-lite files."""
    if not cfg.is_lite_file:
        yield cfg
        return
    with EmbeddedMilvus(cfg.uri) as server:
        yield cfg.model_copy(update={"uri": server.uri})


def build_dataset(
    items: list[GalleryItem], cfg: IngestConfig, model_version: str, loader: ModelLoader
) -> ray.data.Dataset:
    """The lazy read -> encode plan (nothing runs until it is written)."""
    num_blocks = max(1, min(len(items), math.ceil(len(items) / cfg.batch_size)))
    ds: ray.data.Dataset = ray.data.from_items(
        [{"image_id": it.image_id, "uri": it.uri} for it in items], override_num_blocks=num_blocks
    )
    ds = ds.map_batches(
        read_image_bytes, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.num_cpus_per_reader
    )
    return ds.map_batches(
        EncoderActor,
        fn_constructor_args=(cfg.model_path,),
        fn_constructor_kwargs={
            "model_version": model_version,
            "top_k": cfg.top_k_instances,
            "nms_iou": cfg.nms_iou,
            "loader": loader,
            "torch_threads": max(1, int(cfg.num_cpus_per_encoder)),
        },
        compute=ActorPoolStrategy(size=cfg.num_encoders),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.num_cpus_per_encoder,
    )


def run_ingestion(cfg: IngestConfig, *, loader: ModelLoader = load_reir_model) -> IngestSummary:
    """Encode the configured gallery into Milvus; idempotent (reruns upsert the same rows)."""
    items = list_gallery(cfg)
    model_version = model_version_for(cfg.model_path)
    log.info("ingesting %d images with model %s into %s", len(items), model_version, cfg.milvus.collection)
    start = time.perf_counter()
    with shared_milvus(cfg.milvus) as milvus:
        sink = MilvusDatasink(milvus)
        build_dataset(items, cfg, model_version, loader).write_datasink(
            sink,
            concurrency=cfg.write_concurrency,
            ray_remote_args={"num_cpus": cfg.num_cpus_per_writer},
        )
        stats = sink.result
        rows_in_store = _finalize_index(milvus, cfg.build_index, model_version)
    seconds = time.perf_counter() - start
    summary = IngestSummary(
        images=stats.images,
        instances=stats.rows,
        failures=stats.failures,
        seconds=round(seconds, 3),
        images_per_s=round(stats.images / seconds, 3) if seconds > 0 else 0.0,
        model_version=model_version,
        rows_in_store=rows_in_store,
        dead_letter=stats.dead_letter,
    )
    _report(summary, cfg)
    return summary


def _finalize_index(milvus: MilvusConfig, build_index: bool, model_version: str) -> int:
    with MilvusStore.from_config(milvus) as store:
        if not store.exists():
            return 0  # nothing was written (e.g. every image failed)
        if build_index:
            store.build_index(milvus.index_type, milvus.index_params)
            store.load()
        return store.count(SearchFilter(model_version=model_version))


def _report(summary: IngestSummary, cfg: IngestConfig) -> None:
    log.info(
        "ingestion done: %d images, %d instances, %d failures in %.1fs (%.2f img/s); %d rows for %s",
        summary.images, summary.instances, summary.failures, summary.seconds,
        summary.images_per_s, summary.rows_in_store, summary.model_version,
    )  # fmt: skip
    if cfg.dead_letter_path is not None and summary.dead_letter:
        cfg.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        with cfg.dead_letter_path.open("w") as fh:
            for item in summary.dead_letter:
                fh.write(json.dumps(asdict(item)) + "\n")
        log.warning("%d failed images listed in %s", summary.failures, cfg.dead_letter_path)
