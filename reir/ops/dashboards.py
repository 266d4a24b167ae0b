"""Grafana dashboards as code, built from the metric catalog.

``python -m reir.ops.dashboards --out k8s/monitoring/dashboards/`` writes one JSON file
per dashboard (``--namespace reir-dev --out k8s/overlays/dev/dashboards/``: an overlay's,
with its own uids); the files are committed and a test checks they equal what this
module generates, so nobody edits them by hand. Every reir series comes from a
:class:`~reir.platform.telemetry.MetricSpec` in ``ALL_METRICS`` through
:func:`series`, which knows where it is exported:

- Ray (``ray.util.metrics`` in Serve replicas and Ray Data actors) adds the ``ray_``
  prefix: ``reir_query_requests_total`` is scraped as ``ray_reir_query_requests_total``
  and a histogram as ``..._bucket`` / ``_sum`` / ``_count``.
- Jobs that end push to the Pushgateway under the catalog name (see
  :mod:`reir.ops.jobrun`): the ``reir_index_*`` figures.

Serve's own metrics appear only where the running app exports them
(``SERVE_REPLICAS_HEALTHY``, ``SERVE_TARGET_REPLICAS``; checked against a live app in
tests/ops/test_live_metrics.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reir.platform import telemetry as T

RAY_PREFIX = "ray_"
APPLICATION = "reir"  # the Serve application name in k8s/base/rayservice.yaml
SEARCH_ROUTE = "/v1/search"
PUSHED: frozenset[str] = frozenset(
    s.name for s in (T.INDEX_RUNS_TOTAL, T.INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS, T.INDEX_COLLECTION_ROWS)
)
SERVE_REPLICAS_HEALTHY = "ray_serve_deployment_replica_healthy"
SERVE_TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"
SERVE_METRICS: frozenset[str] = frozenset({SERVE_REPLICAS_HEALTHY, SERVE_TARGET_REPLICAS})
RATE = "$__rate_interval"
METRIC_NAME = re.compile(r"\b((?:ray_|reir_)[a-z0-9_]+)\b")
_SELECTED = re.compile(r"\b((?:ray_|reir_)[a-z0-9_]+)\b(\{[^}]*\})?")
# Every query is limited to the namespaces picked in the dashboard's `namespace` variable,
# the label Prometheus adds to each scraped target, so one Grafana can show dev and prod apart.
NAMESPACE_MATCHER = 'namespace=~"$namespace"'


def scoped(expr: str) -> str:
    """``expr`` with :data:`NAMESPACE_MATCHER` in the selector of every metric it reads."""

    def add(m: re.Match[str]) -> str:
        inner = (m.group(2) or "{}")[1:-1]
        return f"{m.group(1)}{{{NAMESPACE_MATCHER}{',' + inner if inner else ''}}}"

    return _SELECTED.sub(add, expr)


def series(spec: T.MetricSpec, suffix: str = "") -> str:
    """The scraped name of ``spec`` (plus ``_bucket``/``_sum``/``_count`` for histograms)."""
    if spec not in T.ALL_METRICS:
        raise ValueError(f"{spec.name} is not in reir.platform.telemetry.ALL_METRICS")
    if suffix and spec.kind != "histogram":
        raise ValueError(f"{spec.name} is a {spec.kind}, it has no {suffix} series")
    prefix = "" if spec.name in PUSHED else RAY_PREFIX
    return f"{prefix}{spec.name}{suffix}"


def _selector(labels: dict[str, str] | None) -> str:
    """``{"status": "~5.."}`` -> ``{status=~"5.."}``: a leading ``~`` makes a regex match."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}=~"{v[1:]}"' if v.startswith("~") else f'{k}="{v}"' for k, v in labels.items()) + "}"


def rate(spec: T.MetricSpec, *, by: Sequence[str] = (), labels: dict[str, str] | None = None, suffix: str = "") -> str:
    grouping = f" by ({', '.join(by)}) " if by else ""
    return f"sum{grouping}(rate({series(spec, suffix)}{_selector(labels)}[{RATE}]))"


def quantile(q: float, spec: T.MetricSpec, *, by: Sequence[str] = (), labels: dict[str, str] | None = None) -> str:
    inner = rate(spec, by=("le", *by), labels=labels, suffix="_bucket")
    return f"histogram_quantile({q}, {inner})"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]


def _quantiles(spec: T.MetricSpec, qs: Iterable[float], *, by: Sequence[str] = (), labels: dict[str, str] | None = None,
               legend_prefix: str = "") -> tuple[Target, ...]:  # fmt: skip
    return tuple(
        Target(quantile(q, spec, by=by, labels=labels), f"{legend_prefix}p{round(q * 100)}") for q in qs
    )


def serving_dashboard() -> Dashboard:
    search = {"route": SEARCH_ROUTE}
    replicas_filter = f'{{application="{APPLICATION}"}}'
    return Dashboard(
        uid="reir-serving",
        title="reir / serving",
        description="Query traffic, latency per stage, Milvus search and replicas of the reir Serve app.",
        panels=(
            Panel("Queries per second", (Target(rate(T.QUERY_REQUESTS_TOTAL, by=("status",), labels=search),
                                                "{{status}}"),), unit="reqps",
                  description="POST /v1/search by HTTP status."),
            Panel("Error ratio (5xx)", (Target(
                f"({rate(T.QUERY_REQUESTS_TOTAL, labels={**search, 'status': '~5..'})} or vector(0)) / "
                f"{rate(T.QUERY_REQUESTS_TOTAL, labels=search)}", "5xx / all"),), unit="percentunit",
                description="Alert ReirQueryErrorRateHigh fires above 2% for 5 minutes."),
            Panel("Query latency (end to end)", _quantiles(T.QUERY_LATENCY_SECONDS, (0.5, 0.9, 0.99), labels=search),
                  unit="s", description="At the ingress; alert ReirQueryLatencyP99High above 1 s."),
            Panel("Latency per stage, p50", _quantiles(T.QUERY_STAGE_LATENCY_SECONDS, (0.5,), by=("stage",),
                                                       legend_prefix="{{stage}} "), unit="s"),
            Panel("Latency per stage, p99", _quantiles(T.QUERY_STAGE_LATENCY_SECONDS, (0.99,), by=("stage",),
                                                       legend_prefix="{{stage}} "), unit="s"),
            Panel("Milvus search latency", _quantiles(T.QUERY_SEARCH_LATENCY_SECONDS, (0.5, 0.9, 0.99)), unit="s",
                  description="ANN search + ranking, measured in the Searcher deployment."),
            Panel("ANN candidates per query", _quantiles(T.QUERY_CANDIDATES, (0.5, 0.99)), unit="short"),
            Panel("Searcher in-memory index rows", (
                Target(f"max({series(T.QUERY_MEMORY_INDEX_ROWS)})", "max over replicas"),
                Target(f"min({series(T.QUERY_MEMORY_INDEX_ROWS)})", "min over replicas"),
            ), unit="short", description="Rows each Searcher replica answers from its exact in-memory index "
                                         "(ServeConfig.memory_index). 0: that replica's searches go to Milvus "
                                         "(off, loading after a start, an alias move or new rows, or over "
                                         "memory_index_max_rows)."),
            Panel("Searcher in-memory index recall@100", (
                Target(f"min({series(T.QUERY_MEMORY_INDEX_RECALL)})", "min over replicas"),
            ), unit="percentunit", description="Against exact search, on each replica's recent queries (1: it "
                                               "scans every row). Below memory_index_recall the replica raises "
                                               "its probe count; alert ReirMemoryIndexRecallLow under 0.9."),
            Panel("Localize errors per second", (Target(rate(T.QUERY_LOCALIZE_ERRORS_TOTAL, by=("reason",)),
                                                        "{{reason}}"),), unit="short",
                  description="Results that kept their stored box because the localize (zoom) stage could not "
                              "read the image (unreadable), run the model (failed) or be reached (unavailable)."),
            Panel("Truncated queries per second", (Target(rate(T.QUERY_TRUNCATED_TOTAL), "truncated/s"),),
                  unit="short", description="Queries longer than the text tower reads (text.max_length tokens): "
                                            "their end was ignored and the answer may miss what it said."),
            Panel("Text-encoder batch size (mean)", (Target(
                f"{rate(T.QUERY_ENCODE_BATCH_SIZE, suffix='_sum')} / {rate(T.QUERY_ENCODE_BATCH_SIZE, suffix='_count')}",
                "texts per forward pass"),), unit="short"),
            Panel("Replicas per deployment", (
                Target(f"sum by (deployment) ({SERVE_REPLICAS_HEALTHY}{replicas_filter})", "{{deployment}} healthy"),
                Target(f"max by (deployment) ({SERVE_TARGET_REPLICAS}{replicas_filter})", "{{deployment}} target"),
            ), unit="short", description="Healthy replicas and the autoscaler's target, per Serve deployment."),
        ),
    )


def indexing_dashboard() -> Dashboard:
    return Dashboard(
        uid="reir-indexing",
        title="reir / indexing",
        description="Ingestion throughput and failures, collection versions and re-index freshness.",
        panels=(
            Panel("Images encoded per second", (Target(rate(T.INGEST_IMAGES_TOTAL), "images/s"),), unit="short"),
            Panel("Instances produced per second", (Target(rate(T.INGEST_INSTANCES_TOTAL), "instances/s"),),
                  unit="short"),
            Panel("Rows written to Milvus per second", (Target(rate(T.INGEST_ROWS_WRITTEN_TOTAL), "rows/s"),),
                  unit="short"),
            Panel("Failed images per second", (Target(rate(T.INGEST_FAILURES_TOTAL, by=("reason",)), "{{reason}}"),),
                  unit="short", description="Unreadable or undecodable images (listed in the dead-letter file)."),
            Panel("Encoder batch latency", _quantiles(T.INGEST_BATCH_LATENCY_SECONDS, (0.5, 0.99)), unit="s"),
            Panel("Last ingestion run, images/s", (Target(f"max({series(T.INGEST_THROUGHPUT_IMAGES_PER_SECOND)})",
                                                          "images/s"),), unit="short", kind="stat"),
            Panel("Incremental re-index: unchanged and deleted images per second", (
                Target(rate(T.INGEST_UNCHANGED_IMAGES_TOTAL), "unchanged/s"),
                Target(rate(T.INGEST_DELETED_IMAGES_TOTAL), "deleted/s")), unit="short",
                description="Unchanged images are skipped (content hash); deleted ones leave the index."),
            Panel("Rows per collection version", (Target(
                f"max by (collection) ({series(T.INDEX_COLLECTION_ROWS)})", "{{collection}}"),), unit="short",
                description="Each collection version; the live one is behind the reir_live alias."),
            Panel("Hours since the last promoted index", (Target(
                f"(time() - max({series(T.INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS)})) / 3600", "hours"),), unit="h",
                kind="stat", description="Alert ReirReindexStale fires after 26 hours."),
            Panel("Last index run", (Target(f"max by (status) ({series(T.INDEX_RUNS_TOTAL)})", "{{status}}"),),
                  kind="stat", description="The status series present is how the last run ended (Pushgateway)."),
        ),
    )


def all_dashboards() -> tuple[Dashboard, ...]:
    return (serving_dashboard(), indexing_dashboard())


def _namespace_variable(namespace: str | None) -> dict[str, Any]:
    current = {"text": namespace, "value": namespace} if namespace else {"text": "All", "value": "$__all"}
    return {"name": "namespace", "label": "Namespace", "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": "label_values(up, namespace)", "refId": "namespaces"},
            "definition": "label_values(up, namespace)", "refresh": 2, "includeAll": True, "allValue": ".*",
            "multi": True, "current": current, "hide": 0}  # fmt: skip


def to_grafana(dash: Dashboard, namespace: str | None = None) -> dict[str, Any]:
    """Grafana dashboard JSON (schema 39) with data-source and namespace variables.

    ``namespace``: the install's namespace (a k8s overlay's): the namespace variable
    starts there and the uid and title carry it, so two installs that share a Grafana
    keep two dashboards instead of overwriting one.
    """
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, panel in enumerate(dash.panels):
        width = 12
        panels.append({
            "id": i + 1, "type": panel.kind, "title": panel.title, "description": panel.description,
            "datasource": datasource,
            "gridPos": {"h": 8, "w": width, "x": (i % 2) * width, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if panel.kind == "timeseries" else {},
            "targets": [
                {"refId": chr(ord("A") + j), "datasource": datasource, "expr": scoped(t.expr),
                 "legendFormat": t.legend}
                for j, t in enumerate(panel.targets)
            ],
        })  # fmt: skip
    return {
        "uid": f"{dash.uid}-{namespace}" if namespace else dash.uid,
        "title": f"{dash.title} ({namespace})" if namespace else dash.title, "description": dash.description,
        "tags": ["reir"], "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": False,
        "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0},
                                _namespace_variable(namespace)]},
        "panels": panels,
    }  # fmt: skip


def render(dash: Dashboard, namespace: str | None = None) -> str:
    return json.dumps(to_grafana(dash, namespace), indent=2, sort_keys=False) + "\n"


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (``ray_*`` and ``reir_*`` identifiers)."""
    return set(METRIC_NAME.findall(expr))


def family(name: str) -> str:
    """``x_bucket`` / ``x_sum`` / ``x_count`` -> ``x``; other names unchanged."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def write_all(out: Path, namespace: str | None = None) -> list[Path]:
    """One file per dashboard, named by its base uid whatever the namespace (the overlays
    replace the monitoring base's ConfigMap keys one for one)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dash in all_dashboards():
        path = out / f"{dash.uid}.json"
        path.write_text(render(dash, namespace))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reir.ops.dashboards", description="write the Grafana dashboards")
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON files")
    parser.add_argument("--namespace", default=None, help="the install's namespace (uid suffix, variable default)")
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.namespace):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
