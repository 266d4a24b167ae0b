"""k8s/: every kustomization renders with the real kustomize; built-in kinds pass the
Kubernetes schemas (kubernetes-validate), KubeRay and Milvus resources their CRDs'
schemas; the Serve config passes Ray's own Serve schema and builds a reir ServeConfig;
the pieces point at each other (ConfigMaps, Secret, PVCs, services, metrics ports)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from reir.platform.config import ServeConfig
from reir.platform.raylocal import SERVE_DATA_PLANE_ENV
from reir.serving.app import IngressDeployment, QueryEncoderDeployment, SearcherDeployment, serve_config_from_args
from reir.settings import command_config
from reir.training.config import TrainConfig
from tests.k8s.support import (
    DEPLOYABLE,
    K8S,
    KUSTOMIZATIONS,
    crd_dir,
    crd_errors,
    crd_schemas,
    deployment,
    kustomize_command,
    render,
)

RAY_KINDS = {"RayService", "RayJob", "RayCronJob", "RayCluster"}
CUSTOM_GROUPS = ("ray.io/", "milvus.io/", "monitoring.coreos.com/")
# `reir ingest` promotes the checked build to the alias itself (exit 1 when the check fails);
# every setting comes from the mounted file's `ingest:` section and reir-env.
REINDEX = ["reir", "ingest", "--config", "/etc/reir/reir.yaml"]
OUT_OF_BAND_SECRETS = {"overlays/prod": {"reir-api-keys"}, "base": {"reir-api-keys"}}


@pytest.fixture(scope="module", autouse=True)
def _kustomize() -> None:
    argv, why = kustomize_command()
    if argv is None:
        pytest.skip(why)


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    if doc["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    if doc["kind"] == "RayCronJob":
        return [spec["jobTemplate"]["rayClusterSpec"]]
    return [spec]


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in RAY_KINDS:
        return [
            g["template"]
            for c in _cluster_specs(doc)
            for g in [c["headGroupSpec"], *c.get("workerGroupSpecs", [])]
        ]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]]
    if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
        return [doc["spec"]["template"]]
    return []


def _configmap_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_one(docs, "ConfigMap", "reir-env")["data"])


def _pod_files(docs: list[dict[str, Any]], tmp: Path) -> tuple[dict[str, str], Path]:
    """(the pods' environment, where /etc/reir is): reir-files written to ``tmp`` and
    REIR_CONFIG pointed there, so reir reads them as it does on the cluster."""
    for name, text in _one(docs, "ConfigMap", "reir-files")["data"].items():
        (tmp / name).write_text(text)
    env = _configmap_env(docs)
    assert env["REIR_CONFIG"].startswith("/etc/reir/")
    return {**env, "REIR_CONFIG": str(tmp / Path(env["REIR_CONFIG"]).name)}, tmp


# --- rendering and schemas ----------------------------------------------------------------------


def test_every_yaml_file_is_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for kust in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kust.read_text())
        entries = spec.get("resources", []) + [p["path"] for p in spec.get("patches", []) if "path" in p]
        listed |= {(kust.parent / e).resolve() for e in entries}
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    examples = {p for p in files if p.name.endswith(".example.yaml")}
    assert files - examples - listed == set(), "manifests no kustomization uses"
    for example in examples:  # documentation of an out-of-band object: still a valid manifest
        assert yaml.safe_load(example.read_text())["kind"] == "Secret"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_named_objects(kustomization: str) -> None:
    docs = render(kustomization)
    assert docs
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys()
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "reir"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_built_in_kinds_pass_the_kubernetes_schemas(kustomization: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    built_in = [d for d in render(kustomization) if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert built_in or kustomization == "monitoring"
    for doc in built_in:
        try:
            kubernetes_validate.validate(doc, latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            pytest.fail(f"{kustomization}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message[:300]}")


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    directory = crd_dir()
    if directory is None:
        pytest.skip("no CRDs: set REIR_K8S_CRDS or place KubeRay/milvus-operator CRDs in ../shared/k8s-crds")
    return crd_schemas(directory)


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_kuberay_and_milvus_resources_pass_their_crd_schemas(
    kustomization: str, schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    custom = [d for d in deployment(kustomization) if d["apiVersion"].startswith(("ray.io/", "milvus.io/"))]
    assert {d["kind"] for d in custom} == RAY_KINDS | {"Milvus"}
    for doc in custom:
        key = (doc["apiVersion"], doc["kind"])
        assert key in schemas, f"no CRD for {key}"
        assert crd_errors(doc, schemas[key]) == [], f"{doc['kind']}/{doc['metadata']['name']}"


def test_crd_validation_rejects_typos_and_wrong_types(schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    svc = _one(render("base"), "RayService", "reir")
    schema = schemas[(svc["apiVersion"], "RayService")]
    typo = copy.deepcopy(svc)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    wrong_type = copy.deepcopy(svc)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    bad_container = copy.deepcopy(svc)
    bad_container["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imag"] = "x"
    for doc in (typo, wrong_type, bad_container):
        assert crd_errors(doc, schema), "the CRD schema accepted a broken RayService"


# --- serving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_serve_config_passes_rays_schema_and_builds_a_reir_config(
    kustomization: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ray.serve.schema import ServeDeploySchema

    docs = render(kustomization)
    svc = _one(docs, "RayService", "reir")
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.import_path == "reir.serving.app:build_app"
    # What build_app sees on the cluster: the args plus the pods' environment (reir-env) and
    # the mounted file ($REIR_CONFIG).
    env, _ = _pod_files(docs, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = serve_config_from_args(dict(app.args))
    assert isinstance(cfg, ServeConfig)
    assert cfg.milvus.uri.startswith("http://") and not cfg.milvus.is_lite_file
    assert cfg.milvus.collection == "reir_live" and cfg.milvus.index_type == "HNSW"
    assert cfg.model_path == "/models/reir/current"
    # The app these args build (the QueryEncoder exists only with encode_in_searcher off).
    assert not cfg.search_in_ingress  # the stages scale apart on the cluster
    built = (IngressDeployment, SearcherDeployment) + (() if cfg.encode_in_searcher else (QueryEncoderDeployment,))
    assert {d.name for d in app.deployments} == {d.name for d in built}  # type: ignore[attr-defined]
    # Every Ray pod starts with Serve's HAProxy data plane, as `reir serve` does locally.
    assert {k: env[k] for k in SERVE_DATA_PLANE_ENV} == SERVE_DATA_PLANE_ENV
    for dep in app.deployments:
        auto = dep.autoscaling_config
        assert dep.num_replicas == "auto" and isinstance(auto, dict), dep.name
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"]


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_rayservice_cluster_shape(kustomization: str) -> None:
    docs = render(kustomization)
    svc = _one(docs, "RayService", "reir")
    assert svc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == ({"cpu"} if kustomization == "overlays/dev" else {"cpu", "gpu"})  # dev: CPU only
    if "gpu" in groups:
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # API keys: the Secret is projected where REIR_SECURITY__API_KEYS_FILE says.
    keys_file = _configmap_env(docs)["REIR_SECURITY__API_KEYS_FILE"]
    for tmpl in _pod_templates(svc):
        (container,) = tmpl["spec"]["containers"]
        mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["reir-etc"]
        (vol,) = [v for v in tmpl["spec"]["volumes"] if v["name"] == "reir-etc"]
        (secret,) = [s["secret"] for s in vol["projected"]["sources"] if "secret" in s]
        assert secret["name"] == "reir-api-keys"
        assert {f"{mount}/{i['path']}" for i in secret["items"]} == {keys_file}


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_every_ray_cluster_matches_ray_and_keeps_work_off_the_head(kustomization: str) -> None:
    for doc in deployment(kustomization):
        if doc["kind"] not in RAY_KINDS:
            continue
        for cluster in _cluster_specs(doc):
            assert cluster["rayVersion"] == ray.__version__, doc["metadata"]["name"]
            assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
            groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
            for group in groups:
                assert group["rayStartParams"]["metrics-export-port"] == "8080"
        for tmpl in _pod_templates(doc):
            for c in tmpl["spec"]["containers"]:
                res = c["resources"]
                assert res["requests"] and res["limits"], f"{doc['metadata']['name']}/{c['name']}"
                assert {"name": "metrics", "containerPort": 8080} in c["ports"]
                assert {"configMapRef": {"name": "reir-env"}} in c["envFrom"]
            assert tmpl["metadata"]["labels"]["reir.io/ray-metrics"] == "true"


# --- jobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_training_jobs_run_deepspeed_with_checkpoint_storage(kustomization: str, tmp_path: Path) -> None:
    docs = deployment(kustomization)
    env, etc = _pod_files(docs, tmp_path)
    gpu = kustomization != "overlays/dev"  # dev trains on CPU workers
    configs = {}
    for stage in ("1", "2"):
        job = _one(docs, "RayJob", f"reir-train-stage{stage}")
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:3] == ["reir", "train", "--config"]
        # As `reir train --config FILE` builds it in the pod: file < REIR_* environment.
        cfg = configs[stage] = command_config("train", config=etc / Path(argv[3]).name, env=env)
        assert isinstance(cfg, TrainConfig)
        assert (cfg.stage, cfg.use_gpu) == (stage, gpu) and cfg.zero_stage >= (1 if gpu else 0)
        assert cfg.output_dir.startswith("/models/")
        (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        pod = workers["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == ("1" if gpu else None)
        assert workers["replicas"] >= 1
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert not mounts["/models"].get("readOnly"), "checkpoints are written to /models"
        claim = {v["name"]: v for v in pod["volumes"]}[mounts["/models"]["name"]]["persistentVolumeClaim"]
        pvc = _one(docs, "PersistentVolumeClaim", claim["claimName"])
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    stage1 = configs["1"]
    assert configs["2"].model == f"{stage1.output_dir}/{stage1.run_name}/model", "stage 2 starts from stage 1's model"


def _jobrun_command(argv: list[str]) -> list[str]:
    assert argv[:3] == ["python", "-m", "reir.ops.jobrun"]
    return argv[argv.index("--") + 1 :]


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_ingestion_and_both_reindex_schedules_run_the_same_promoting_command(
    kustomization: str, tmp_path: Path
) -> None:
    docs = deployment(kustomization)
    env, etc = _pod_files(docs, tmp_path)
    one_off = shlex.split(_one(docs, "RayJob", "reir-ingest")["spec"]["entrypoint"])
    cron = _one(docs, "RayCronJob", "reir-reindex")
    ray_cron = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    plain = _one(docs, "CronJob", "reir-reindex-submit")
    (container,) = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = shlex.split(container["args"][0])
    assert script[:4] == ["exec", "ray", "job", "submit"]
    submitted = script[script.index("--") + 1 :]
    for argv in (one_off, ray_cron, submitted):
        assert _jobrun_command(argv) == REINDEX
        assert argv[argv.index("--pushgateway") + 1] == "$REIR_PUSHGATEWAY_URL"
    # The schedules skip quietly until a model is published; the one-off ingest must not.
    for argv in (ray_cron, submitted):
        assert argv[argv.index("--skip-unless-exists") + 1] == "/models/reir/current"
    assert "--skip-unless-exists" not in one_off
    # The plain CronJob submits to the batch cluster's head service (KubeRay names it <cluster>-head-svc).
    address = {e["name"]: e["value"] for e in container["env"]}["RAY_ADDRESS"]
    assert address == f"http://{_one(docs, 'RayCluster', 'reir-batch')['metadata']['name']}-head-svc:8265"
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    # What `reir ingest --config /etc/reir/reir.yaml` builds in the pod: the file's ingest section,
    # its shared milvus keys and the environment (the Milvus URI, the HNSW index it asks for).
    cfg = command_config("ingest", config=etc / Path(REINDEX[-1]).name, env=env)
    assert cfg.milvus.uri == env["REIR_MILVUS__URI"] and cfg.milvus.index_type == "HNSW"
    assert (cfg.alias, cfg.model_path, cfg.top_k_instances) == ("reir_live", "/models/reir/current", 30)
    assert cfg.milvus.collection == "reir_instances"  # the versions' base name behind the alias
    # `kubectl exec ... reir index list` finds the same Milvus with no flag.
    index = command_config("index", env=env)
    assert (index.milvus.uri, index.alias) == (cfg.milvus.uri, cfg.alias)
    if kustomization != "base":  # exactly one schedule is live per environment
        active = [d["kind"] for d in (cron, plain) if not d["spec"].get("suspend", False)]
        assert len(active) == 1, active


# --- wiring -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_milvus_uri_points_at_the_operators_service(kustomization: str) -> None:
    docs = render(kustomization)
    (milvus,) = _kind(docs, "Milvus")
    assert _configmap_env(docs)["REIR_MILVUS__URI"] == f"http://{milvus['metadata']['name']}-milvus:19530"
    assert milvus["spec"]["mode"] == ("cluster" if kustomization == "overlays/prod" else "standalone")


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_every_referenced_configmap_secret_and_claim_exists(kustomization: str) -> None:
    docs = deployment(kustomization)
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    missing = set()
    for doc in docs:
        for tmpl in _pod_templates(doc):
            spec = tmpl["spec"]
            for c in spec["containers"]:
                missing |= {("ConfigMap", e["configMapRef"]["name"]) for e in c.get("envFrom", [])} - have
                declared = {v["name"] for v in spec.get("volumes", [])}
                assert {m["name"] for m in c.get("volumeMounts", [])} <= declared
            for v in spec.get("volumes", []):
                refs = [("PersistentVolumeClaim", v.get("persistentVolumeClaim", {}).get("claimName")),
                        ("ConfigMap", v.get("configMap", {}).get("name"))]  # fmt: skip
                for src in v.get("projected", {}).get("sources", []):
                    refs += [("ConfigMap", src.get("configMap", {}).get("name")),
                             ("Secret", src.get("secret", {}).get("name"))]  # fmt: skip
                missing |= {r for r in refs if r[1] and r not in have}
    allowed = {("Secret", s) for s in OUT_OF_BAND_SECRETS.get(kustomization, set())}
    assert missing <= allowed, missing - allowed


@pytest.mark.parametrize("kustomization", ("overlays/dev", "overlays/prod"))
def test_overlay_sets_namespace_and_images(kustomization: str) -> None:
    docs = deployment(kustomization)
    assert {d["metadata"].get("namespace") for d in docs} == {"reir-dev" if "dev" in kustomization else "reir"}
    images = {c["image"] for d in docs for t in _pod_templates(d) for c in t["spec"]["containers"]}
    reir_images = {i for i in images if "reir" in i.split("/")[-1]}
    if kustomization == "overlays/prod":
        assert reir_images == {"registry.example.com/reir/reir:0.1.0", "registry.example.com/reir/reir-gpu:0.1.0"}
    else:
        assert reir_images == {"reir:dev"}  # CPU only: no CUDA image


# --- monitoring ---------------------------------------------------------------------------------


def test_monitors_select_what_exports_metrics() -> None:
    """No CRD for the Prometheus Operator's kinds is at hand, so their contract is checked
    against the objects they must find: labels and named ports."""
    mon = render("monitoring")
    base = deployment("base")
    pod_monitor = _one(mon, "PodMonitor", "reir-ray")
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    ray_templates = [t for d in base if d["kind"] in RAY_KINDS for t in _pod_templates(d)]
    assert ray_templates
    for tmpl in ray_templates:
        assert selector.items() <= tmpl["metadata"]["labels"].items()
        assert endpoint["port"] in {p["name"] for c in tmpl["spec"]["containers"] for p in c["ports"]}
    svc_monitor = _one(mon, "ServiceMonitor", "reir-pushgateway")
    (svc_endpoint,) = svc_monitor["spec"]["endpoints"]
    assert svc_endpoint["honorLabels"] is True
    services = [s for s in _kind(base, "Service")
                if svc_monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]  # fmt: skip
    assert [s["metadata"]["name"] for s in services] == ["reir-pushgateway"]
    assert svc_endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert _configmap_env(base)["REIR_PUSHGATEWAY_URL"] == "http://reir-pushgateway:9091"


def test_dashboards_ship_as_grafana_sidecar_configmap() -> None:
    (cm,) = [d for d in render("monitoring") if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == sorted(p.name for p in (K8S / "monitoring" / "dashboards").glob("*.json"))


def test_dev_api_key_file_is_what_serving_reads() -> None:
    import hashlib

    from reir.platform.auth import load_key_file

    (key,) = load_key_file(Path(__file__).resolve().parents[2] / "k8s" / "overlays" / "dev" / "api-keys")
    assert key.sha256 == hashlib.sha256(b"reir-dev-key").hexdigest() and "search" in key.scopes
