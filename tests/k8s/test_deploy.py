"""The first deploy in order (docs/deploy.md): `kubectl apply -k` of an install creates only
long-lived objects, the one-off jobs come suspended from their own kustomization and chain
(stage 1 -> stage 2 -> publish -> first ingest), the dev overlay fits a small CPU-only
cluster, the Pushgateway keeps its figures, and each overlay ships its own dashboards."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.k8s.support import DEPLOYABLE, JOBS, kustomize_command, render

ONE_OFF = {"RayJob", "Job"}
LONG_LIVED = {"ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "Deployment", "Milvus", "RayService",
              "RayCluster", "RayCronJob", "CronJob", "PodMonitor", "ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module", autouse=True)
def _kustomize() -> None:
    argv, why = kustomize_command()
    if argv is None:
        pytest.skip(why)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container a workload can start (Ray head and worker groups, Job and CronJob pods)."""
    spec = doc.get("spec", {})
    clusters = [spec.get("rayClusterConfig"), spec.get("rayClusterSpec"),
                spec.get("jobTemplate", {}).get("rayClusterSpec")]  # fmt: skip
    if doc["kind"] == "RayCluster":
        clusters.append(spec)
    pods = [g["template"]["spec"] for c in clusters if c for g in [c["headGroupSpec"], *c.get("workerGroupSpecs", [])]]
    if doc["kind"] in {"Deployment", "Job"}:
        pods.append(spec["template"]["spec"])
    if doc["kind"] == "CronJob":
        pods.append(spec["jobTemplate"]["spec"]["template"]["spec"])
    return [c for p in pods for c in p["containers"]]


def _gib(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * factor
    return float(quantity) / 2**30


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_apply_k_starts_nothing_that_runs_once(kustomization: str) -> None:
    long_lived = render(kustomization)
    assert {d["kind"] for d in long_lived} <= LONG_LIVED
    jobs = render(JOBS[kustomization])
    assert sorted(d["metadata"]["name"] for d in jobs) == [
        "reir-ingest", "reir-publish-model", "reir-train-stage1", "reir-train-stage2"]
    for job in jobs:
        assert job["kind"] in ONE_OFF and job["spec"]["suspend"] is True, job["metadata"]["name"]
    namespaces = {d["metadata"].get("namespace") for d in long_lived + jobs}
    assert len(namespaces) == 1, "the jobs run beside the install they belong to"


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_publish_step_links_training_to_what_ingestion_and_serving_read(kustomization: str) -> None:
    long_lived, jobs = render(kustomization), render(JOBS[kustomization])
    files = _one(long_lived, "ConfigMap", "reir-files")["data"]
    stage2 = yaml.safe_load(files["train-stage2.yaml"])
    (publish,) = _containers(_one(jobs, "Job", "reir-publish-model"))
    argv = publish["command"]
    assert argv[:3] == ["reir", "model", "publish"]
    assert argv[3] == f"{stage2['output_dir']}/{stage2['run_name']}", "publishes stage 2's run"
    to = argv[argv.index("--to") + 1]
    current = f"{to}/current"
    assert not {m["mountPath"]: m for m in publish["volumeMounts"]}["/models"].get("readOnly")
    assert yaml.safe_load(files["reir.yaml"])["ingest"]["model_path"] == current
    svc = _one(long_lived, "RayService", "reir")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["model_path"] == current


def test_dev_overlay_fits_a_small_cpu_only_cluster() -> None:
    long_lived, jobs = render("overlays/dev"), render("overlays/dev/jobs")
    for doc in long_lived + jobs:
        for container in _containers(doc):
            resources = container["resources"]
            assert "nvidia.com/gpu" not in resources.get("limits", {}) | resources.get("requests", {})
            assert _gib(resources["limits"]["memory"]) <= 4, (doc["metadata"]["name"], container["name"])
        assert "tolerations" not in json.dumps(doc), "no GPU taints to tolerate on a CPU cluster"
    for name in ("train-stage1.yaml", "train-stage2.yaml"):
        assert yaml.safe_load(_one(long_lived, "ConfigMap", "reir-files")["data"][name])["use_gpu"] is False
    # What runs at once after `kubectl apply -k` (minimum replicas; suspended schedules
    # excluded): RayService head + one worker, the batch cluster's head, the Pushgateway.
    busy = 0.0
    svc = _one(long_lived, "RayService", "reir")["spec"]["rayClusterConfig"]
    busy += _cpus(svc["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    for group in svc["workerGroupSpecs"]:
        cpu = group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
        busy += group["minReplicas"] * _cpus(cpu)
    batch = _one(long_lived, "RayCluster", "reir-batch")["spec"]
    busy += _cpus(batch["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    milvus = _one(long_lived, "Milvus", "reir-milvus")["spec"]["components"]["standalone"]["resources"]
    busy += _cpus(milvus["requests"]["cpu"])
    assert busy <= 6, f"{busy} CPUs requested before any job runs"


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_pushgateway_keeps_its_figures_on_a_volume(kustomization: str) -> None:
    docs = render(kustomization)
    gateway = _one(docs, "Deployment", "reir-pushgateway")
    assert gateway["spec"]["strategy"]["type"] == "Recreate"
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.split("=", 1) for a in container["args"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if args["--persistence.file"].startswith(mounts[v["name"]] + "/")]
    claim = _one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_each_install_ships_dashboards_with_its_own_uids_and_namespace() -> None:
    seen: dict[str, str] = {}
    for kustomization, namespace in (("overlays/dev", "reir-dev"), ("overlays/prod", "reir")):
        (cm,) = [d for d in render(kustomization) if d["metadata"]["name"].startswith("reir-grafana-dashboards")]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in cm["data"].values():
            dash = json.loads(text)
            assert dash["uid"] not in seen, f"{dash['uid']} is shipped by {seen.get(dash['uid'])} too"
            seen[dash["uid"]] = kustomization
            (variable,) = [v for v in dash["templating"]["list"] if v["name"] == "namespace"]
            assert variable["current"]["value"] == namespace
            for panel in dash["panels"]:
                assert all('namespace=~"$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]
