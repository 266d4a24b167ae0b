"""The one list of metric names, ``reir_<area>_<what>_<unit>``.

Emitters (Serve deployments, Ray Data actors) take names from here so dashboards and
alerts have a single source of truth. Definitions only: creating the metric objects is
left to the runtime that owns them (``ray.util.metrics`` inside actors/replicas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MetricKind = Literal["counter", "histogram", "gauge"]

# Latency buckets in seconds: a query is a text encode + one ANN search, so the
# interesting range is 1 ms .. a few seconds.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()


QUERY_REQUESTS_TOTAL = MetricSpec(
    "reir_query_requests_total", "counter", "HTTP query requests by route and status", ("route", "status")
)
QUERY_LATENCY_SECONDS = MetricSpec(
    "reir_query_latency_seconds", "histogram", "End-to-end query latency at the ingress", ("route",)
)
QUERY_ENCODE_BATCH_SIZE = MetricSpec(
    "reir_query_encode_batch_size", "histogram", "Texts per batched text-encoder call"
)
QUERY_SEARCH_LATENCY_SECONDS = MetricSpec(
    "reir_query_search_latency_seconds", "histogram", "Milvus ANN search + ranking latency"
)
QUERY_STAGE_LATENCY_SECONDS = MetricSpec(
    "reir_query_stage_latency_seconds",
    "histogram",
    "Per-stage query latency (stage: encode, search, rerank, localize, total)",
    ("stage",),
)
QUERY_CANDIDATES = MetricSpec("reir_query_candidates", "histogram", "ANN candidates considered per query")
QUERY_MEMORY_INDEX_ROWS = MetricSpec(
    "reir_query_memory_index_rows",
    "gauge",
    "Rows in a Searcher replica's in-memory exact index (0: its searches go to Milvus: off, loading, or too big)",
)
QUERY_MEMORY_INDEX_RECALL = MetricSpec(
    "reir_query_memory_index_recall",
    "gauge",
    "Recall@100 of a Searcher replica's in-memory index against exact search, measured on its recent "
    "queries (1: it searches every row)",
)
QUERY_LOCALIZE_ERRORS_TOTAL = MetricSpec(
    "reir_query_localize_errors_total",
    "counter",
    "Results whose stored box was kept because the localize stage could not refine it "
    "(reason: unreadable image, failed model call, unavailable stage)",
    ("reason",),
)
QUERY_TRUNCATED_TOTAL = MetricSpec(
    "reir_query_truncated_total",
    "counter",
    "Queries longer than the text tower reads (text.max_length tokens): their end was ignored",
)
INGEST_IMAGES_TOTAL = MetricSpec("reir_ingest_images_total", "counter", "Images encoded")
INGEST_INSTANCES_TOTAL = MetricSpec("reir_ingest_instances_total", "counter", "Instance rows produced")
INGEST_FAILURES_TOTAL = MetricSpec(
    "reir_ingest_failures_total", "counter", "Images skipped (unreadable or undecodable)", ("reason",)
)
INGEST_BATCH_LATENCY_SECONDS = MetricSpec(
    "reir_ingest_batch_latency_seconds", "histogram", "Encoder time per image batch"
)
INGEST_ROWS_WRITTEN_TOTAL = MetricSpec("reir_ingest_rows_written_total", "counter", "Rows upserted into Milvus")
INGEST_THROUGHPUT_IMAGES_PER_SECOND = MetricSpec(
    "reir_ingest_throughput_images_per_second", "gauge", "Images per second of the last ingestion run"
)
INGEST_UNCHANGED_IMAGES_TOTAL = MetricSpec(
    "reir_ingest_unchanged_images_total", "counter", "Listed images skipped because their content is already indexed"
)
INGEST_DELETED_IMAGES_TOTAL = MetricSpec(
    "reir_ingest_deleted_images_total", "counter", "Images removed from the index because they left the gallery"
)
INDEX_RUNS_TOTAL = MetricSpec(
    "reir_index_runs_total", "counter", "Index (re-)build runs by outcome (status: ok, failed)", ("status",)
)
INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS = MetricSpec(
    "reir_index_last_success_timestamp_seconds", "gauge", "Unix time of the last promoted index version"
)
INDEX_COLLECTION_ROWS = MetricSpec(
    "reir_index_collection_rows", "gauge", "Rows in a collection version", ("collection",)
)

# A job run under ``reir.ops.jobrun`` finds here the path of a file to write its summary
# (JSON) to; jobrun pushes the figures a short-lived process cannot be scraped for.
JOB_SUMMARY_ENV = "REIR_JOB_SUMMARY"

ALL_METRICS: tuple[MetricSpec, ...] = (
    QUERY_REQUESTS_TOTAL,
    QUERY_LATENCY_SECONDS,
    QUERY_ENCODE_BATCH_SIZE,
    QUERY_SEARCH_LATENCY_SECONDS,
    QUERY_STAGE_LATENCY_SECONDS,
    QUERY_CANDIDATES,
    QUERY_MEMORY_INDEX_ROWS,
    QUERY_MEMORY_INDEX_RECALL,
    QUERY_LOCALIZE_ERRORS_TOTAL,
    QUERY_TRUNCATED_TOTAL,
    INGEST_IMAGES_TOTAL,
    INGEST_INSTANCES_TOTAL,
    INGEST_FAILURES_TOTAL,
    INGEST_BATCH_LATENCY_SECONDS,
    INGEST_ROWS_WRITTEN_TOTAL,
    INGEST_THROUGHPUT_IMAGES_PER_SECOND,
    INGEST_UNCHANGED_IMAGES_TOTAL,
    INGEST_DELETED_IMAGES_TOTAL,
    INDEX_RUNS_TOTAL,
    INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS,
    INDEX_COLLECTION_ROWS,
)


def ray_metric(spec: MetricSpec, boundaries: tuple[float, ...] = LATENCY_BUCKETS_S) -> Any:
    """Create the ``ray.util.metrics`` object for ``spec`` (call inside an actor/replica)."""
    from ray.util import metrics  # Ray is imported only where metrics are emitted

    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    return metrics.Histogram(
        spec.name, description=spec.description, boundaries=list(boundaries), tag_keys=spec.tag_keys
    )
