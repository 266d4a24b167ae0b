"""Every manifest parses; the RayService's Serve config passes Ray's own Serve schema and
builds a real reir ServeConfig from its args."""

from __future__ import annotations

from pathlib import Path

import yaml

from reir.platform.config import ServeConfig
from reir.serving.app import serve_config_from_args

K8S = Path(__file__).resolve().parents[2] / "k8s"


def _docs() -> list[dict]:
    return [d for p in sorted(K8S.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_every_manifest_parses_and_names_its_kind() -> None:
    docs = _docs()
    assert docs
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d


def test_rayservice_serve_config_is_valid_for_ray_and_reir() -> None:
    from ray.serve.schema import ServeDeploySchema

    (svc,) = [d for d in _docs() if d["kind"] == "RayService"]
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.import_path == "reir.serving.app:build_app"
    cfg = serve_config_from_args(dict(app.args))
    assert isinstance(cfg, ServeConfig) and cfg.milvus.uri.startswith("http://")
    assert svc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    import ray

    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
