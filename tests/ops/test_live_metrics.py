"""The metrics a running reir really exports, read by a real Prometheus.

One stack for the module: the session's local Ray (its metrics export port), a
milvus-lite server, a real ingestion run by ``reir.ops.jobrun`` around ``reir ingest``
(the production re-index wrapper, pushing its outcome to a real Pushgateway), the
Serve app on the tiny checkpoint answering HTTP queries, and Debian's Prometheus
scraping Ray's metrics port and the Pushgateway with reir's alert rules loaded.

The Serve app is deployed from the dev overlay's ``serveConfigV2`` (autoscaling,
actor options and all) through Serve's declarative path, the call the Ray dashboard's
``PUT /api/serve/applications/`` makes when KubeRay deploys a RayService; only the
model path and the ``reir-env`` values that point at this machine are replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reir.ops.dashboards import all_dashboards, family, metric_names, series, to_grafana
from reir.platform import telemetry as T
from reir.platform.milvus_server import EmbeddedMilvus, free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
QUERIES = 12
APP = "reir"  # the application name the dashboards and alerts filter on
COLLECTION = "gallery"

# Families this branch's code exports once the app has answered queries and an index job ran.
EXPECTED_LIVE = {
    "ray_reir_query_requests_total", "ray_reir_query_latency_seconds", "ray_reir_query_encode_batch_size",
    "ray_reir_query_search_latency_seconds", "ray_reir_ingest_images_total", "ray_reir_ingest_instances_total",
    "ray_reir_ingest_failures_total", "ray_reir_ingest_batch_latency_seconds",
    "ray_reir_query_stage_latency_seconds", "ray_reir_query_candidates", "ray_reir_ingest_rows_written_total",
    "ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas",
    "reir_index_runs_total", "reir_index_last_success_timestamp_seconds", "reir_index_collection_rows",
    "ray_reir_query_memory_index_rows",  # set by each Searcher replica from its start (milvus-lite here: on)
    "ray_reir_query_memory_index_recall",  # set by each Searcher once its index loaded (1 here: an exact scan)
}  # fmt: skip
# In the catalog, on a dashboard and emitted by the code, but not always there to scrape in
# this module: whether they are depends on what ran before it in the same Ray session.
SOMETIMES = {
    # set by the ingestion driver, a short-lived process here (gone before a scrape)
    "ray_reir_ingest_throughput_images_per_second": "ingestion driver (last run's images/s)",
    # emitted only by a re-run that finds unchanged or deleted images (this module ingests
    # once; tests/ingestion/test_reindex.py re-runs in the pytest process, whose series stay)
    "ray_reir_ingest_unchanged_images_total": "ingestion (incremental re-run)",
    "ray_reir_ingest_deleted_images_total": "ingestion (incremental re-run)",
    # counted only when the localize stage (off here) fails on an image: tests/serving/test_localize.py
    "ray_reir_query_localize_errors_total": "serving, localize stage errors",
    # counted only for a query longer than the text tower reads: tests/serving/test_rerank.py
    "ray_reir_query_truncated_total": "serving, truncated queries",
}


def _wait_for(what: str, probe: Callable[[], Any], timeout: float = 90.0, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except requests.RequestException as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package: {name}; .ci/run installs it)")
    return path


@dataclass
class Stack:
    ray_metrics: str
    pushgateway: str
    serve_url: str
    latencies: list[float]
    model_version: str
    old_workers: frozenset[str]
    rows: int  # rows in COLLECTION after the index job, counted in Milvus

    def fresh(self, selector: str) -> str:
        """``selector`` plus a matcher that leaves out series of workers older than this stack."""
        if not self.old_workers:
            return selector
        return selector[:-1] + f',WorkerId!~"{"|".join(sorted(self.old_workers))}"}}'


def _dev_serve_config(model: Path, milvus_uri: str, port: int) -> Any:
    from ray.serve.schema import ServeDeploySchema

    overlay = yaml.safe_load((ROOT / "k8s" / "overlays" / "dev" / "rayservice-dev.yaml").read_text())
    config = yaml.safe_load(overlay["spec"]["serveConfigV2"])
    (reir_env,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "config.yaml").read_text())
                   if d["metadata"]["name"] == "reir-env"]  # fmt: skip
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    assert app["name"] == APP
    app["args"]["model_path"] = str(model)
    # On the cluster these come from the pods' envFrom: reir-env.
    # auth: tests/serving; REIR_CONFIG names the pods' mounted file, absent here.
    env = {k: v for k, v in reir_env["data"].items() if k not in {"REIR_SECURITY__API_KEYS_FILE", "REIR_CONFIG"}}
    app["runtime_env"] = {"env_vars": {**env, "REIR_MILVUS__URI": milvus_uri,
                                       "REIR_MILVUS__COLLECTION": COLLECTION}}  # fmt: skip
    return ServeDeploySchema.model_validate(config)


def _app_running(name: str) -> bool:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    app = serve.status().applications.get(name)
    if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
        raise AssertionError(f"{name}: {app.message}")
    return app is not None and app.status == ApplicationStatus.RUNNING


def _worker_ids(text: str) -> set[str]:
    return {s.labels["WorkerId"] for fam in text_string_to_metric_families(text) for s in fam.samples
            if "WorkerId" in s.labels}  # fmt: skip


def _sample_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


@contextlib.contextmanager
def _daemon(name: str, *args: str, timeout: float) -> Iterator[str]:
    """Run ``name args --web.listen-address=...`` until its ``/-/ready`` answers; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([_binary(name), *args, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(name, lambda: requests.get(f"{url}/-/ready", timeout=2).ok, timeout=timeout)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pushgateway() -> Iterator[str]:
    with _daemon("prometheus-pushgateway", timeout=30) as url:
        yield url


@pytest.fixture(scope="module")
def stack(
    ray_session: None, tiny_checkpoint: Path, make_gallery: Callable[..., Path], pushgateway: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:  # fmt: skip
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start

    from reir.platform.modeling import model_version_for

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    ray_metrics = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    tmp = tmp_path_factory.mktemp("ops-live")
    gallery = make_gallery(tmp / "gallery", n=6, corrupt=1)
    with EmbeddedMilvus(str(tmp / "milvus.db")) as milvus:
        # The production re-index command shape: jobrun around `reir ingest`, as its own
        # Ray driver on the running cluster (RAY_ADDRESS), pushing the outcome.
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "reir.ops.jobrun", "--job", "reir-index", "--pushgateway", pushgateway, "--",
             sys.executable, "-m", "reir.cli", "ingest", "--gallery", str(gallery), "--model", str(tiny_checkpoint),
             "--milvus-uri", milvus.uri, "--collection", COLLECTION, "--no-alias", "--batch-size", "4"],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        from pymilvus import MilvusClient

        counter = MilvusClient(uri=milvus.uri)
        (count,) = counter.query(COLLECTION, filter="", output_fields=["count(*)"])
        counter.close()

        # Earlier test modules' Serve replicas are gone, but Ray may still export their
        # last values for a while: this module counts only series of workers started now.
        old_workers = frozenset(_worker_ids(requests.get(ray_metrics, timeout=10).text))
        port = free_port()
        serve.shutdown()  # a fresh controller, so the HTTP options below apply
        client = serve_start(http_options={"host": "127.0.0.1", "port": port})
        # Shut Serve down however this ends: a controller left on its port breaks every later module.
        try:
            client.deploy_apps(_dev_serve_config(tiny_checkpoint, milvus.uri, port))
            _wait_for(f"Serve app {APP!r} running", lambda: _app_running(APP), timeout=300, every=2)
            url = f"http://127.0.0.1:{port}"
            latencies = []
            for i in range(QUERIES):
                start = time.perf_counter()
                r = requests.post(f"{url}/v1/search", json={"query": f"the red square {i}", "top_k": 3}, timeout=60)
                latencies.append(time.perf_counter() - start)
                assert r.status_code == 200, r.text
            yield Stack(ray_metrics, pushgateway, url, latencies, model_version_for(tiny_checkpoint), old_workers,
                        int(count["count(*)"]))
        finally:
            serve.shutdown()


def _scrape_until(url: str, families: set[str]) -> set[str]:
    """Ray reports metrics to its exporter every few seconds: wait until ``families`` show up."""
    def probe() -> set[str] | None:
        names = {family(n) for n in _sample_names(requests.get(url, timeout=10).text)}
        return names if families <= names else None

    return _wait_for(f"{sorted(families)} at {url}", probe, timeout=90, every=2)


def test_dashboards_read_only_metrics_the_running_code_exports(stack: Stack) -> None:
    ray_live = {f for f in EXPECTED_LIVE if f.startswith("ray_")}
    exported = _scrape_until(stack.ray_metrics, ray_live)
    exported |= {family(n) for n in _sample_names(requests.get(f"{stack.pushgateway}/metrics", timeout=10).text)}
    assert EXPECTED_LIVE <= exported, f"not exported: {sorted(EXPECTED_LIVE - exported)}"

    used = {family(n) for d in all_dashboards() for p in d.panels for t in p.targets for n in metric_names(t.expr)}
    unknown = used - EXPECTED_LIVE - set(SOMETIMES)
    assert not unknown, f"dashboards read metrics nothing exports: {sorted(unknown)}"
    assert EXPECTED_LIVE <= used, f"exported but on no dashboard: {sorted(EXPECTED_LIVE - used)}"
    # Every catalog metric has a panel, under the name its exporter gives it.
    assert {series(spec) for spec in T.ALL_METRICS} <= used
    rules = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    in_rules = {family(n) for g in rules for r in g["rules"] for n in metric_names(r["expr"])}
    assert in_rules <= EXPECTED_LIVE | set(SOMETIMES), sorted(in_rules - EXPECTED_LIVE - set(SOMETIMES))


def test_index_job_pushed_its_outcome(stack: Stack) -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(requests.get(f"{stack.pushgateway}/metrics", timeout=10).text)
        for s in fam.samples
    }
    assert samples[("reir_index_runs_total", (("instance", ""), ("job", "reir-index"), ("status", "ok")))] == 1.0
    pushed_at = samples[("reir_index_last_success_timestamp_seconds", (("instance", ""), ("job", "reir-index")))]
    assert time.time() - 900 < pushed_at <= time.time()
    # The rows of the collection it wrote, as `reir ingest` left them for jobrun (no alias: COLLECTION).
    rows = samples[("reir_index_collection_rows", (("collection", COLLECTION), ("instance", ""), ("job", "reir-index")))]
    assert rows == stack.rows > 0


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = tmp / "reir-alerts.yaml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"]))
    ray_target = stack.ray_metrics.removeprefix("http://").removesuffix("/metrics")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": [ray_target]}]},
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [stack.pushgateway.removeprefix("http://")]}]},
        ],
    }  # fmt: skip
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    with _daemon("prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                 timeout=60) as url:
        yield url


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _value(prom: str, expr: str) -> float | None:
    result = _query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_reads_back_query_counts_and_latency_quantiles(stack: Stack, prometheus: str) -> None:
    search = 'route="/v1/search"'
    ok = "sum(" + stack.fresh("ray_reir_query_requests_total{" + search + ',status="200"}') + ")"
    assert _wait_for("the query count in Prometheus", lambda: _value(prometheus, ok) == QUERIES, timeout=90)
    buckets = "sum by (le) (" + stack.fresh("ray_reir_query_latency_seconds_bucket{" + search + "}") + ")"
    p50 = _value(prometheus, f"histogram_quantile(0.5, {buckets})")
    p99 = _value(prometheus, f"histogram_quantile(0.99, {buckets})")
    assert p50 is not None and p99 is not None
    # The server-side latency is inside the client's; a quantile lies within its bucket.
    # Past the last finite bucket, histogram_quantile answers that bucket's bound (a slow
    # first query on a loaded machine lands there).
    bound = min((b for b in T.LATENCY_BUCKETS_S if b >= max(stack.latencies)), default=T.LATENCY_BUCKETS_S[-1])
    assert 0 < p50 <= p99 <= bound, (p50, p99, bound, stack.latencies)
    count = _value(prometheus, "sum(" + stack.fresh("ray_reir_query_latency_seconds_count{" + search + "}") + ")")
    assert count == QUERIES, count
    healthy_series = stack.fresh(f'ray_serve_deployment_replica_healthy{{application="{APP}"}}')
    deployments = {"Ingress", "QueryEncoder", "Searcher"}

    def healthy_by_deployment() -> dict[str, float]:
        healthy = _query(prometheus, f"sum by (deployment) ({healthy_series})")
        return {r["metric"]["deployment"]: float(r["value"][1]) for r in healthy}

    # Each replica's gauge reaches Prometheus on its own export + scrape cycle: wait for all three.
    _wait_for("every deployment's health gauge", lambda: set(healthy_by_deployment()) == deployments, timeout=60)
    by_deployment = healthy_by_deployment()
    # At least one healthy replica each (the dev overlay autoscales 1..2, and a replica a
    # slow health check replaced may still show its last value for a while).
    assert set(by_deployment) == deployments, by_deployment
    assert all(v >= 1.0 for v in by_deployment.values()), by_deployment


def test_every_dashboard_query_runs_in_prometheus(stack: Stack, prometheus: str) -> None:
    _wait_for("a few scrapes", lambda: (_value(prometheus, 'count_over_time(up{job="ray"}[1m])') or 0) >= 5)
    for dash in all_dashboards():
        for panel in to_grafana(dash)["panels"]:
            for target in panel["targets"]:
                # Grafana fills these in; the local stack's series carry no namespace label.
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$namespace", ".*")
                result = _query(prometheus, expr)
                live = {family(n) for n in metric_names(expr)} <= EXPECTED_LIVE
                assert bool(result) or not live, f"{dash.uid} / {panel['title']}: no data for {expr}"


def test_alert_rules_load_and_evaluate_cleanly(stack: Stack, prometheus: str) -> None:
    def rules() -> list[dict[str, Any]] | None:
        groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        found = [r for g in groups for r in g["rules"]]
        return found if found and all(r.get("lastEvaluation", "").startswith("2") for r in found) else None

    evaluated = _wait_for("rule evaluation", rules, timeout=30)
    assert {r["name"] for r in evaluated} >= {"ReirQueryErrorRateHigh", "ReirQueryLatencyP99High", "ReirReindexStale"}
    assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
    # A healthy stack: no 5xx, a fresh index, replicas up.
    firing = {r["metric"]["alertname"] for r in _query(prometheus, 'ALERTS{alertstate="firing"}')}
    healthy_stack = {"ReirQueryErrorRateHigh", "ReirReindexStale", "ReirReindexFailed", "ReirServeDeploymentUnhealthy"}
    assert not firing & healthy_stack, firing
