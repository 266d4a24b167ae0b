"""Offline gallery ingestion: images -> instance embeddings -> Milvus, on Ray Data.

Plan: list the gallery on the driver and join it with the ledger (content hash and row
count of every image already indexed) -> ``from_items`` -> the stream -> remove deleted
images -> build the index + load -> with an ``alias``: check the version and promote it.

The stream has two layouts (``IngestConfig.pipeline``):

* **fused** (CPU, the default there): ``map_batches(IngestActor, ActorPoolStrategy)``. Each
  actor loads the model once, then per batch reads, hashes and drops unchanged images,
  decodes at the model's input size, encodes, upserts the rows, trims stale ranks and
  records the ledger (:class:`~reir.ingestion.sink.RowWriter`), and hands the driver one
  row of counts. Nothing but the items and the counts crosses the object store, and no
  task is started per batch: on 2 cores the per-batch tasks and the pixel and row hops
  of the staged layout cost about a third of the machine (bench/ingest.py).
* **staged** (GPU, the default there): ``map_batches(read_and_decode)`` (tasks: read,
  hash, drop unchanged images, decode) -> ``map_batches(EncoderActor, ActorPoolStrategy)``
  (the model only) -> ``write_datasink(MilvusDatasink)`` (upserts, trims, ledger), so the
  CPU work beside a GPU model runs on other cores than the actor's one.

Failure-rate guard (:mod:`reir.ingestion.guard`): the encoder actors report every batch to
one shared counter; once ``failure_rate_min_images`` were tried and more than
``max_failure_rate`` of them failed (a broken model, an unreadable mount), the run stops
with :class:`~reir.errors.IngestionAborted` naming the counts and first errors, and the
version is marked ``check_failed`` (nothing is promoted).

Milvus-lite files: a ``.db`` path is a data directory locked by the one process that
opens it, but write tasks run in several worker processes, so the pipeline starts
:class:`EmbeddedMilvus` on that directory for the run and everyone (driver, write tasks)
talks to it over gRPC; afterwards the ``.db`` path is again a plain file store.

Resources: Ray Data waits forever when actors plus read/write tasks ask for more CPUs
(or GPUs) than the cluster has, so :func:`plan_resources` shrinks the encoder pool to
fit; ``object_store_memory_limit`` caps what the job keeps in the object store, which
back-pressures reading on a gallery larger than memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from reir.ingestion.encoder import InstanceEncoder
from reir.ingestion.gallery import (
    PREV_HASH,
    PREV_INSTANCES,
    GalleryItem,
    list_gallery,
    read_and_decode,
    read_image_bytes,
)
from reir.ingestion.guard import abort_if_tripped, check_batch, start_guard
from reir.ingestion.ledger import Ledger, LedgerEntry, instance_pks, summarize
from reir.ingestion.progress import Progress
from reir.ingestion.records import DeadLetter
from reir.ingestion.sink import MilvusDatasink, RowWriter, WriteStats
from reir.platform import telemetry as T
from reir.platform.catalog import IndexCatalog, IndexVersion, version_name
from reir.platform.config import IngestConfig, MilvusConfig
from reir.platform.milvus_server import EmbeddedMilvus
from reir.platform.modeling import (
    ModelLoader,
    embedding_dim_for,
    input_size_for,
    load_reir_image_model,
    model_version_for,
)
from reir.platform.raylocal import init_ray
from reir.platform.store import MilvusStore, SearchFilter

log = logging.getLogger(__name__)

# Called by each encoder actor with its batch number before encoding (tests inject faults).
FaultHook = Callable[[int], None]


@dataclass(frozen=True)
class IngestSummary:
    images: int  # images encoded by this run (with or without instances)
    instances: int  # instance rows written by this run
    failures: int  # images this run could not read or decode (dead letters)
    seconds: float
    images_per_s: float
    model_version: str = ""
    rows_in_store: int = 0
    dead_letter: list[DeadLetter] = field(default_factory=list)
    collection: str = ""
    alias: str | None = None
    promoted: bool = False
    check: str = ""  # "ok", or why the version was not promoted
    listed: int = 0
    unchanged: int = 0  # listed images already indexed with the same content
    deleted: int = 0  # images no longer listed, removed from the index
    dead_letter_total: int = 0  # failed images recorded in the ledger for this collection
    encoders: int = 0
    device: str = "cpu"
    pipeline: str = ""  # the stream's layout: "fused" or "staged" (see the module docstring)
    # Where the time went (seconds): "plan" (listing, ledger read), "stream" (read -> encode ->
    # write, the encoder actors' start-up included), "finalize" (deletions, index build, flush,
    # load), "promote" (the check and the alias switch).
    phases: dict[str, float] = field(default_factory=dict)
    # (seconds since the stream started, images encoded): the rate over time.
    progress: list[tuple[float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResourcePlan:
    encoders: int
    cpus_per_encoder: float
    gpus_per_encoder: float
    device: str
    readers: int = 1  # read (+ decode) tasks at once (staged)
    fused: bool = False  # each encoder actor reads, encodes and writes (see the module docstring)


def plan_resources(cfg: IngestConfig, cluster: Mapping[str, float], *, cores: int | None = None) -> ResourcePlan:
    """Encoder pool that fits the cluster next to the read and write tasks.

    ``cfg.num_encoders`` unset: one actor per GPU (``cuda``), or on CPU as many actors of
    ``num_cpus_per_encoder`` as the CPUs left by the reader and writers hold, at most
    ``cores // num_cpus_per_encoder`` when ``cores`` (the machine's cores, for a one-machine
    Ray instance whose logical CPUs may be more) is given. Several one-thread actors beat one
    actor with several torch threads on a busy small machine: a thread team stalls at every
    barrier while a reader, a writer or Milvus holds one of its cores (on 2 cores: about 95
    against 78 images/s). The fused layout has no read or write tasks: the actors get every CPU.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ValueError("device=cuda but the Ray cluster has no GPU")
    gpus_per = (cfg.num_gpus_per_encoder or 1.0) if device == "cuda" else 0.0
    fused = cfg.pipeline == "fused" or (cfg.pipeline == "auto" and device == "cpu")
    others = 0.0 if fused else cfg.num_cpus_per_reader + cfg.write_concurrency * cfg.num_cpus_per_writer
    room = max(cpus - others, 0.0)
    per = cfg.num_cpus_per_encoder
    encoders = cfg.num_encoders
    if encoders is None:
        encoders = max(1, int(gpus // gpus_per) if gpus_per else int(min(room, cores or room) // per))
    if gpus_per:
        encoders = max(1, min(encoders, int(gpus // gpus_per)))
    if encoders * per > room:
        encoders = max(1, min(encoders, int(room // per)))
        if encoders * per > room:  # even one actor does not fit: give it what is left
            per = max(round(room, 2), 0.1)
        log.warning("encoder pool reduced to %d actor(s) x %.2f CPU to fit %.1f CPUs", encoders, per, cpus)
    if fused:
        return ResourcePlan(encoders, per, gpus_per, device, readers=0, fused=True)
    # Readers: as many as the CPUs the encoders and writers leave (at least one). More only
    # start worker processes that compete with the encoders' start-up and model for the cores.
    readers = cfg.read_concurrency or max(1, int(cpus - encoders * per - cfg.write_concurrency * cfg.num_cpus_per_writer))
    return ResourcePlan(encoders, per, gpus_per, device, readers)


def _local_cores() -> int | None:
    """This machine's cores when the Ray instance is this one machine (its logical CPUs may
    be more, see reir.platform.raylocal), else None."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    return os.cpu_count() if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here else None


class EncoderActor:
    """Ray Data actor: loads the model once, then encodes batches with InstanceEncoder."""

    def __init__(
        self,
        model_path: str,
        *,
        model_version: str,
        top_k: int | None = None,
        min_score: float | None = None,
        nms_iou: float = 0.7,
        loader: ModelLoader = load_reir_image_model,
        torch_threads: int = 1,
        device: str = "cpu",
        max_pixels: int = 100_000_000,
        fault: FaultHook | None = None,
        guard: Any = None,
        model_batch: int | None = None,
    ) -> None:
        started = time.perf_counter()
        import torch

        # Fractional-CPU actors on a small box must not each spawn a full thread pool.
        torch.set_num_threads(max(1, torch_threads))
        model, processor = loader(model_path)
        if device != "cpu" and hasattr(model, "to"):
            model = model.to(device)
        self.encoder = InstanceEncoder(
            model, processor, model_version=model_version, top_k=top_k, min_score=min_score, nms_iou=nms_iou,
            device=device, bf16=device != "cpu", max_pixels=max_pixels, model_batch=model_batch,
        )  # fmt: skip
        self.fault = fault
        self.guard = guard  # the run's FailureGuard actor (None: no guard)
        self.batches = 0
        self._images = T.ray_metric(T.INGEST_IMAGES_TOTAL)
        self._instances = T.ray_metric(T.INGEST_INSTANCES_TOTAL)
        self._failures = T.ray_metric(T.INGEST_FAILURES_TOTAL)
        self._latency = T.ray_metric(T.INGEST_BATCH_LATENCY_SECONDS)
        log.info("encoder actor ready in %.1f s (%s, %d torch threads)", time.perf_counter() - started, device,
                 torch.get_num_threads())  # fmt: skip

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.batches += 1
        if self.fault is not None:
            self.fault(self.batches)
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
        failed = enc.failures - before[2]
        if self.guard is not None and enc.images - before[0] + failed > 0:
            check_batch(self.guard, enc.images - before[0] + failed, failed,
                        [d.error for d in enc.dead_letter[before[2]:]])
        return out


class IngestActor(EncoderActor):
    """The fused layout's Ray Data actor: per batch of gallery items, read (and drop unchanged
    images), decode, encode (:class:`EncoderActor`), then write with its own
    :class:`~reir.ingestion.sink.RowWriter`; returns one row of counts (and the failed images)
    for the driver to add up."""

    def __init__(self, model_path: str, *, milvus: MilvusConfig, input_size: int | None, ledger: bool = True,
                 **encoder: Any) -> None:  # fmt: skip
        super().__init__(model_path, **encoder)
        self.input_size = input_size
        self.writer = RowWriter(milvus, model_version=encoder["model_version"], ledger=ledger)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:  # type: ignore[override]
        if self.input_size:
            read = read_and_decode(batch, input_size=self.input_size, max_pixels=self.encoder.max_pixels)
        else:
            read = read_image_bytes(batch)
        return stats_row(self.writer.write(super().__call__(read)))


def stats_row(stats: WriteStats) -> dict[str, np.ndarray]:
    """One batch's :class:`WriteStats` as a one-row batch (the failed images as JSON)."""
    dead = json.dumps([asdict(d) for d in stats.dead_letter])
    return {"images": np.asarray([stats.images]), "rows": np.asarray([stats.rows]),
            "failures": np.asarray([stats.failures]), "trimmed": np.asarray([stats.trimmed]),
            "dead_letter": np.asarray([dead], dtype=object)}  # fmt: skip


def add_stats_rows(total: WriteStats, batch: Mapping[str, np.ndarray]) -> None:
    """Fold a batch of :func:`stats_row` rows into ``total``."""
    for i in range(len(batch["images"])):
        total.merge(WriteStats(rows=int(batch["rows"][i]), images=int(batch["images"][i]),
                               failures=int(batch["failures"][i]), trimmed=int(batch["trimmed"][i]),
                               dead_letter=[DeadLetter(**d) for d in json.loads(str(batch["dead_letter"][i]))]))  # fmt: skip


@contextlib.contextmanager
def shared_milvus(cfg: MilvusConfig) -> Iterator[MilvusConfig]:
    """``cfg`` with a URI every process can open: a server for milvus-lite files (one request
    thread, so that the actors' concurrent upserts cannot tear its write-ahead log:
    :data:`reir.platform.milvus_server.WRITERS_SAFE_WORKERS`)."""
    if not cfg.is_lite_file:
        yield cfg
        return
    with EmbeddedMilvus(cfg.uri) as server:
        yield cfg.model_copy(update={"uri": server.uri})


@contextlib.contextmanager
def data_limits(cfg: IngestConfig) -> Iterator[None]:
    """Ray Data back-pressure for this job: an object store budget, bounded actor queues."""
    from ray.data._internal.execution.interfaces import ExecutionResources

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.resource_limits, ctx.enable_progress_bars
    if cfg.object_store_memory_limit is not None:
        ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=cfg.object_store_memory_limit)
    ctx.enable_progress_bars = False  # the run's own progress (reir.ingestion.progress) says it in one line
    try:
        with warnings.catch_warnings():
            # A small or incremental run has fewer blocks than write tasks: Ray Data's advice
            # to raise the block count is noise there.
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
            yield
    finally:
        ctx.execution_options.resource_limits, ctx.enable_progress_bars = saved


def build_dataset(
    items: list[dict[str, Any]],
    cfg: IngestConfig,
    model_version: str,
    loader: ModelLoader,
    plan: ResourcePlan,
    fault: FaultHook | None = None,
    guard: Any = None,
    milvus: MilvusConfig | None = None,
) -> ray.data.Dataset:
    """The lazy plan (nothing runs until it is consumed): staged, read -> encode (the sink is
    added by the caller); fused, read + encode + write into ``milvus`` -> rows of counts."""
    per_block = fused_batch_images(cfg) if plan.fused else cfg.batch_size
    num_blocks = max(1, min(len(items), math.ceil(len(items) / per_block)))
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=num_blocks)
    encoder: dict[str, Any] = {
        "model_version": model_version,
        "top_k": cfg.top_k_instances,
        "min_score": cfg.min_instance_score,
        "nms_iou": cfg.nms_iou,
        "loader": loader,
        "torch_threads": max(1, int(plan.cpus_per_encoder)),
        "device": plan.device,
        "max_pixels": cfg.max_image_pixels,
        "fault": fault,
        "guard": guard,
        "model_batch": cfg.batch_size,
    }
    pool: dict[str, Any] = {
        "compute": ActorPoolStrategy(size=plan.encoders, max_tasks_in_flight_per_actor=cfg.max_tasks_in_flight_per_actor),
        # fused: an actor's batch is one upsert of about upsert_batch_size rows (the model still
        # sees batch_size images at a time)
        "batch_size": per_block,
        "batch_format": "numpy",
        "num_cpus": plan.cpus_per_encoder,
        "num_gpus": plan.gpus_per_encoder or None,
        **({"resources": dict(cfg.encoder_resources)} if cfg.encoder_resources else {}),
    }
    if plan.fused:
        if milvus is None:
            raise ValueError("the fused plan writes from the encoder actors: pass the target milvus config")
        writing = {"milvus": milvus, "input_size": input_size_for(cfg.model_path), "ledger": True}
        return ds.map_batches(IngestActor, fn_constructor_args=(cfg.model_path,),
                              fn_constructor_kwargs={**encoder, **writing}, **pool)  # fmt: skip
    input_size = input_size_for(cfg.model_path) if cfg.decode_in_reader else None
    if input_size is not None:
        ds = ds.map_batches(read_and_decode, fn_kwargs={"input_size": input_size, "max_pixels": cfg.max_image_pixels},
                            batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.num_cpus_per_reader,
                            concurrency=plan.readers)  # fmt: skip
    else:
        ds = ds.map_batches(read_image_bytes, batch_size=cfg.batch_size, batch_format="numpy",
                            num_cpus=cfg.num_cpus_per_reader, concurrency=plan.readers)  # fmt: skip
    return ds.map_batches(EncoderActor, fn_constructor_args=(cfg.model_path,), fn_constructor_kwargs=encoder, **pool)


def fused_batch_images(cfg: IngestConfig) -> int:
    """Images per fused actor batch: ``milvus.upsert_batch_size`` rows at ``top_k_instances`` per
    image (unset: 10, about what the default policy stores), rounded up to whole model batches
    (``batch_size``)."""
    images = max(1, math.ceil(cfg.milvus.upsert_batch_size / (cfg.top_k_instances or 10)))
    return max(1, math.ceil(images / cfg.batch_size)) * cfg.batch_size


def _plan_items(items: list[GalleryItem], known: Mapping[str, LedgerEntry]) -> list[dict[str, Any]]:
    return [
        {"image_id": it.image_id, "uri": it.uri, **it.metadata,
         PREV_HASH: known[it.image_id].content_hash if it.image_id in known else "",
         PREV_INSTANCES: known[it.image_id].instances if it.image_id in known else 0}
        for it in items
    ]  # fmt: skip


def run_ingestion(
    cfg: IngestConfig, *, loader: ModelLoader = load_reir_image_model, fault: FaultHook | None = None
) -> IngestSummary:
    """Encode the new and changed images of the gallery into Milvus; see the module docstring.

    Idempotent and resumable: rows have deterministic keys and the ledger remembers
    finished images, so a rerun encodes only what is new, changed or unfinished.
    """
    items = list_gallery(cfg)
    model_version = model_version_for(cfg.model_path)
    init_ray()  # RAY_ADDRESS or a local instance, never a dead cluster Ray's address file names
    plan = plan_resources(cfg, ray.cluster_resources(), cores=_local_cores())
    start = time.perf_counter()
    with shared_milvus(cfg.milvus) as milvus:
        # Connections are not held across the (long) dataset run: an idle gRPC channel's
        # keepalive pings get it closed by the server ("too many pings").
        with MilvusStore.from_config(milvus) as control:
            catalog = IndexCatalog(control) if cfg.alias else None
            version = _target_version(cfg, catalog, model_version) if catalog is not None else None
            collection = version.name if version is not None else milvus.collection
            ledger = Ledger(control, collection=collection, model_version=model_version)
            known = ledger.entries() if cfg.incremental else {}
        target = milvus.model_copy(update={"collection": collection, "fallback_collection": None})
        # A new collection gets its index before its rows (a reir checkpoint says the dim), so
        # the end of the run only flushes and loads.
        dim = embedding_dim_for(cfg.model_path)
        indexed = cfg.build_index and dim is not None and _create_indexed(target, dim)
        log.info("ingesting %d images (%d known) with model %s into %s", len(items), len(known), model_version,
                 collection)  # fmt: skip
        guard = start_guard(cfg.max_failure_rate, cfg.failure_rate_min_images)
        expected = len(items) - sum(1 for it in items if it.image_id in known)
        phases: dict[str, float] = {}

        def lap(name: str) -> None:  # the seconds since the previous phase ended
            phases[name] = time.perf_counter() - start - sum(phases.values())

        lap("plan")
        progress = Progress(lambda: ray.get(guard.counts.remote(), timeout=30), expected,
                            interval_s=cfg.progress_interval_s)  # fmt: skip
        try:
            with data_limits(cfg), progress:
                ds = build_dataset(_plan_items(items, known), cfg, model_version, loader, plan, fault, guard, target)
                if plan.fused:
                    stats = WriteStats()
                    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                        add_stats_rows(stats, batch)
                else:
                    sink = MilvusDatasink(target, model_version=model_version, ledger=True)
                    ds.write_datasink(sink, concurrency=cfg.write_concurrency,
                                      ray_remote_args={"num_cpus": cfg.num_cpus_per_writer})  # fmt: skip
                    stats = sink.result
        except Exception:
            abort_if_tripped(guard, milvus, version, len(items))
            raise
        finally:
            ray.kill(guard)
        lap("stream")
        with MilvusStore.from_config(milvus) as control:
            ledger = Ledger(control, collection=collection, model_version=model_version, create=False)
            deleted = _remove_deleted(control, ledger, known, items, model_version) if cfg.incremental and not cfg.limit else 0
            rows_in_store = _finalize_index(target, cfg.build_index, model_version, indexed=indexed)
            entries = ledger.entries()
            expected_rows, dead_total = summarize(entries)
            lap("finalize")
            check, promoted = "", False
            if version is not None:
                catalog = IndexCatalog(control)
                check, promoted = _check_and_promote(catalog, control, version, cfg, entries, model_version,
                                                     rows_in_store)  # fmt: skip
            lap("promote")
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
        collection=collection,
        alias=cfg.alias,
        promoted=promoted,
        check=check,
        listed=len(items),
        unchanged=len(items) - stats.images - stats.failures,
        deleted=deleted,
        dead_letter_total=dead_total,
        encoders=plan.encoders,
        device=plan.device,
        pipeline="fused" if plan.fused else "staged",
        phases={name: round(value, 3) for name, value in phases.items()},
        progress=progress.samples,
    )
    if expected_rows != rows_in_store:
        log.warning("ledger expects %d rows, collection has %d", expected_rows, rows_in_store)
    _report(summary, cfg)
    return summary


def _target_version(cfg: IngestConfig, catalog: IndexCatalog, model_version: str) -> IndexVersion:
    """Continue this model's newest version (resume / incremental), or start a new one."""
    assert cfg.alias is not None
    base = cfg.milvus.collection
    if not cfg.rebuild:
        existing = catalog.resumable(cfg.alias, base, model_version)
        if existing is not None:
            log.info("continuing index version %s (%s)", existing.name, existing.state)
            return existing
    built_at = time.time()
    name = version_name(base, model_version, built_at)
    while catalog.get(name) is not None or catalog.exists(name):
        built_at += 1
        name = version_name(base, model_version, built_at)
    info = {"index_type": cfg.milvus.index_type, "metadata_fields": cfg.milvus.metadata_fields}
    return catalog.record(IndexVersion(name=name, base=base, alias=cfg.alias, model_version=model_version,
                                       built_at=built_at, info=json.dumps(info)))  # fmt: skip


def _remove_deleted(
    store: MilvusStore, ledger: Ledger, known: Mapping[str, LedgerEntry], items: list[GalleryItem], model_version: str
) -> int:
    """Images in the ledger but no longer listed: delete their rows, then forget them."""
    listed = {it.image_id for it in items}
    gone = [image_id for image_id in known if image_id not in listed]
    if not gone:
        return 0
    pks = [pk for i in gone for pk in instance_pks(model_version, i, range(known[i].instances))]
    store.delete(pks, collection=ledger.collection)
    ledger.remove(gone)
    log.info("removed %d deleted images (%d rows)", len(gone), len(pks))
    return len(gone)


def _create_indexed(milvus: MilvusConfig, dim: int) -> bool:
    """Create ``milvus.collection`` with its vector index when it does not exist yet; whether
    it was created. Indexing the empty collection is instant, where indexing it at the end
    costs a second per 40k rows on milvus-lite, which also reads the index's description by
    counting every row (18 s at 1M), and a Milvus server indexes each segment as it seals."""
    with MilvusStore.from_config(milvus) as store:
        if store.exists():
            return False
        store.ensure_collection(dim)
        store.build_index(milvus.index_type, milvus.index_params)
        return True


def _finalize_index(milvus: MilvusConfig, build_index: bool, model_version: str, *, indexed: bool = False) -> int:
    """When ``build_index``: build the index (unless the run created the collection with it,
    ``indexed``), flush and load. Returns the rows of ``model_version`` in the collection."""
    with MilvusStore.from_config(milvus) as store:
        if not store.exists():
            return 0  # nothing was written (e.g. every image failed)
        if build_index:
            if not indexed:
                store.build_index(milvus.index_type, milvus.index_params)
            store.flush()  # seal what was written so it is searched through the index
            store.load()
        return store.count(SearchFilter(model_version=model_version))


def check_version(
    store: MilvusStore, entries: Mapping[str, LedgerEntry], model_version: str, samples: int, rows: int
) -> str:
    """"ok" when the collection holds exactly the ledger's rows and sampled embeddings find their own rows."""
    expected, _ = summarize(entries)
    if expected == 0:
        return "no instance rows"
    if rows != expected:
        return f"row count {rows} != {expected} expected"
    with_rows = sorted(i for i, e in entries.items() if e.instances > 0)
    step = max(1, len(with_rows) // max(samples, 1))
    pks = [instance_pks(model_version, i, [0])[0] for i in with_rows[::step][:samples]]
    got = store.get(pks, output_fields=["pk", "embedding"], strong=True)
    if len(got) != len(pks):
        return f"{len(pks) - len(got)} sampled rows missing"
    for row in got:
        hits = store.search(np.asarray(row["embedding"], dtype=np.float32), top_n=10)[0]
        if not hits or (row["pk"] not in {h.pk for h in hits} and hits[0].score < 0.9999):
            return f"known query {row['pk']} did not find its own row"
    return "ok"


def _check_and_promote(
    catalog: IndexCatalog, control: MilvusStore, version: IndexVersion, cfg: IngestConfig,
    entries: Mapping[str, LedgerEntry], model_version: str, rows: int,
) -> tuple[str, bool]:  # fmt: skip
    assert cfg.alias is not None
    with MilvusStore(control.uri, version.name, token=cfg.milvus.token, search_params=cfg.milvus.search_params) as s:
        check = check_version(s, entries, model_version, cfg.check_samples, rows) if s.exists() else "no collection"
    info = {**json.loads(version.info or "{}"), "check": check}
    if check != "ok":
        catalog.update(version.name, state="check_failed", rows=rows, info=json.dumps(info))
        log.error("index version %s not promoted: %s", version.name, check)
        return check, False
    catalog.update(version.name, state="ready" if version.state != "live" else "live", rows=rows, info=json.dumps(info))
    catalog.promote(cfg.alias, version.name)
    log.info("alias %s -> %s (%d rows)", cfg.alias, version.name, rows)
    return check, True


def _report(summary: IngestSummary, cfg: IngestConfig) -> None:
    log.info(
        "ingestion done: %d images, %d instances, %d failures, %d unchanged, %d deleted in %.1fs (%.2f img/s); "
        "%d rows in %s", summary.images, summary.instances, summary.failures, summary.unchanged, summary.deleted,
        summary.seconds, summary.images_per_s, summary.rows_in_store, summary.collection,
    )  # fmt: skip
    if ray.is_initialized():
        T.ray_metric(T.INGEST_THROUGHPUT_IMAGES_PER_SECOND).set(summary.images_per_s)
        if summary.unchanged:
            T.ray_metric(T.INGEST_UNCHANGED_IMAGES_TOTAL).inc(summary.unchanged)
        if summary.deleted:
            T.ray_metric(T.INGEST_DELETED_IMAGES_TOTAL).inc(summary.deleted)
    if cfg.dead_letter_path is not None and summary.dead_letter:
        cfg.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        with cfg.dead_letter_path.open("w") as fh:
            for item in summary.dead_letter:
                fh.write(json.dumps(asdict(item)) + "\n")
        log.warning("%d failed images listed in %s", summary.failures, cfg.dead_letter_path)
