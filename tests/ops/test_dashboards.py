"""Dashboards are generated from the metric catalog: the committed JSON is exactly what
``python -m reir.ops.dashboards`` writes, and every query reads catalog series."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reir.ops import dashboards as D
from reir.platform import telemetry as T

COMMITTED = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "dashboards"


K8S = COMMITTED.parents[1]
# Where each copy lives and the namespace it was generated for (None: the monitoring base's).
COPIES = {COMMITTED: None, K8S / "overlays" / "dev" / "dashboards": "reir-dev",
          K8S / "overlays" / "prod" / "dashboards": "reir"}


@pytest.mark.parametrize("directory", list(COPIES), ids=lambda p: str(p.relative_to(K8S)))
def test_committed_dashboards_equal_the_generated_ones(directory: Path, tmp_path: Path) -> None:
    namespace = COPIES[directory]
    assert D.main(["--out", str(tmp_path), *(["--namespace", namespace] if namespace else [])]) == 0
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_text() for p in directory.glob("*.json")}
    assert generated.keys() == committed.keys()
    hint = f"python -m reir.ops.dashboards --out {directory}" + (f" --namespace {namespace}" if namespace else "")
    for name, text in generated.items():
        assert committed[name] == text, f"{name} is stale: {hint}"


def test_every_query_is_limited_to_the_chosen_namespaces() -> None:
    assert D.scoped("max(reir_index_runs_total)") == 'max(reir_index_runs_total{namespace=~"$namespace"})'
    assert D.scoped('rate(ray_x_bucket{route="/v1/search"}[5m])') == (
        'rate(ray_x_bucket{namespace=~"$namespace",route="/v1/search"}[5m])')
    dev = D.to_grafana(D.serving_dashboard(), "reir-dev")
    assert dev["uid"] == "reir-serving-reir-dev" != D.to_grafana(D.serving_dashboard(), "reir")["uid"]
    for panel in dev["panels"]:
        for target in panel["targets"]:
            names = D.metric_names(target["expr"])
            assert target["expr"].count('namespace=~"$namespace"') >= len(names) > 0, target["expr"]


def test_dashboards_are_valid_grafana_json_with_unique_ids() -> None:
    for path in COMMITTED.glob("*.json"):
        dash = json.loads(path.read_text())
        assert dash["uid"] == path.stem and dash["panels"]
        assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
        assert len({p["title"] for p in dash["panels"]}) == len(dash["panels"])
        for panel in dash["panels"]:
            assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "${datasource}"
                                            for t in panel["targets"])  # fmt: skip


def test_every_query_reads_catalog_series_or_serves_own() -> None:
    allowed = {D.series(s) for s in T.ALL_METRICS} | D.SERVE_METRICS
    for dash in D.all_dashboards():
        for panel in dash.panels:
            for target in panel.targets:
                names = {D.family(n) for n in D.metric_names(target.expr)}
                assert names and names <= allowed, (panel.title, names - allowed)


def test_series_names_follow_the_exporter() -> None:
    assert D.series(T.QUERY_REQUESTS_TOTAL) == "ray_reir_query_requests_total"
    assert D.series(T.QUERY_LATENCY_SECONDS, "_bucket") == "ray_reir_query_latency_seconds_bucket"
    assert D.series(T.INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS) == "reir_index_last_success_timestamp_seconds"
    with pytest.raises(ValueError, match="no _bucket"):
        D.series(T.QUERY_REQUESTS_TOTAL, "_bucket")
    with pytest.raises(ValueError, match="not in"):
        D.series(T.MetricSpec("reir_made_up_total", "counter", "x"))


def test_metric_name_helpers() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(ray_reir_query_latency_seconds_bucket{route="/v1/search"}[5m])))'
    assert D.metric_names(expr) == {"ray_reir_query_latency_seconds_bucket"}
    assert D.family("ray_x_bucket") == D.family("ray_x_count") == "ray_x"
    assert D.family("reir_index_runs_total") == "reir_index_runs_total"
