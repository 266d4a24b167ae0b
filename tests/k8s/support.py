"""Rendering kustomizations with the real tool, and validating custom resources
against the CRDs their operators publish."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "monitoring", "jobs", "overlays/dev", "overlays/dev/jobs", "overlays/prod", "overlays/prod/jobs")
# Each install: its long-lived kustomization (`kubectl apply -k`) and its one-off jobs.
DEPLOYABLE = ("base", "overlays/dev", "overlays/prod")
JOBS = {"base": "jobs", "overlays/dev": "overlays/dev/jobs", "overlays/prod": "overlays/prod/jobs"}
MIN_KUSTOMIZE = (4, 0)  # `labels:`, inline JSON6902 `patches:` with targets


def kustomize_command() -> tuple[list[str] | None, str]:
    """(argv prefix, why-not). Prefers ``kubectl kustomize``, then ``kustomize build``."""
    found = []
    if shutil.which("kubectl"):
        found.append((["kubectl", "kustomize"], ["kubectl", "version", "--client"], r"Kustomize Version: v(\d+)\.(\d+)"))
    if shutil.which("kustomize"):
        found.append((["kustomize", "build"], ["kustomize", "version"], r"v(\d+)\.(\d+)\.\d+"))
    if not found:
        return None, "neither kubectl nor kustomize is installed (Debian: kubernetes-client; or a kustomize binary)"
    for argv, version_cmd, pattern in found:
        out = subprocess.run(version_cmd, check=False, capture_output=True, text=True, timeout=60).stdout
        m = re.search(pattern, out)
        if m and (int(m.group(1)), int(m.group(2))) >= MIN_KUSTOMIZE:
            return argv, ""
    return None, f"kustomize older than v{MIN_KUSTOMIZE[0]}.{MIN_KUSTOMIZE[1]} (no `labels`/targeted patches)"


@cache
def render(kustomization: str) -> list[dict[str, Any]]:
    argv, why = kustomize_command()
    if argv is None:
        raise RuntimeError(why)
    proc = subprocess.run([*argv, str(K8S / kustomization)], check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed for {kustomization}:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def deployment(kustomization: str) -> list[dict[str, Any]]:
    """Everything an install creates: the long-lived objects plus its (suspended) jobs."""
    return render(kustomization) + render(JOBS[kustomization])


def crd_dir() -> Path | None:
    """``$REIR_K8S_CRDS``, else ``../shared/k8s-crds`` beside the checkout."""
    env = os.environ.get("REIR_K8S_CRDS")
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "k8s-crds", ROOT.parents[1] / "shared" / "k8s-crds"]
    return next((p for p in candidates if p.is_dir() and any(p.glob("*.yaml"))), None)


def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 CRD schema as JSON Schema that rejects unknown fields.

    The API server prunes unknown fields silently; rejecting them here turns a typo
    (``minReplica``) into a test failure. ``x-kubernetes-preserve-unknown-fields``
    keeps a node open; ``x-kubernetes-int-or-string`` admits both types; ``nullable``
    admits null.
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) if k in {"items", "not"} or k.endswith("Of") else v for k, v in node.items()}
    if "properties" in node:
        out["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_node = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if node.get("type") == "object" and "properties" in node and not open_node:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_schemas(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> JSON Schema`` for every CRD version in ``directory``."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = strict_schema(schema)
    return schemas


def crd_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(doc)]
