"""Two Ray nodes, no shared disk: ingestion and serving run on the node without the gallery.

The gallery is served over HTTP by this test process and listed by ``http://`` URIs only;
:mod:`tests.multinode_cluster` starts a head (1 CPU, a ``gallery`` resource) and a worker (a
``remote`` resource, which the encoder actors and the Serve replicas ask for) as separate
raylets, ingests, serves, searches and reports where every actor ran.
It runs in its own process (and Ray temp dir), so it never meets the session's local Ray;
the driver is a session leader, and every process it leaves behind (raylets, agents, workers,
milvus-lite) is found by that session, or by the temp dir, and killed: never a ``ray stop``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reir.platform.raylocal import LOCAL_RAY_SERVE_ENV
from tests.http_files import serve_files

REPO = Path(__file__).resolve().parents[1]
DRIVER_TIMEOUT_S = 420


def _pids_where(match: Callable[[Path], bool]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if match(entry):
                    pids.append(int(entry.name))
    return pids


def _in_session(sid: int) -> Callable[[Path], bool]:
    # Ray's processes stay in the driver's session (they change process group, not session).
    return lambda proc: int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid


def _naming(marker: str) -> Callable[[Path], bool]:
    return lambda proc: marker in (proc / "cmdline").read_bytes().decode(errors="replace")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _ray_temp_dir() -> Iterator[str]:
    # Short (Ray's socket paths must fit 107 bytes) and unique: it tags this cluster's processes.
    path = tempfile.mkdtemp(prefix="reir-mn-", dir="/tmp")
    try:
        yield path
    finally:
        _kill(_pids_where(_naming(path)))  # raylets and agents name it; workers retitle themselves
        shutil.rmtree(path, ignore_errors=True)


def _run_driver(spec_path: Path) -> subprocess.CompletedProcess[str]:
    """The driver as a session leader, so everything it starts can be found (and stopped) by session."""
    # Not the session Ray's: its address, and what ray.init sets in the driver's environment.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_CLIENT_MODE", "PYTHONBREAKPOINT")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_cluster", str(spec_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"multi-node driver ran over {DRIVER_TIMEOUT_S} s:\n{out[-4000:]}")
    finally:
        _kill(_pids_where(_in_session(proc.pid)))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _nodes_of(report: dict[str, Any], match: Callable[[dict[str, str]], bool]) -> set[str]:
    return {a["node"] for a in report["actors"] if match(a)}


def test_ingestion_and_serving_run_on_the_node_without_the_gallery(
    tmp_path: Path, fake_checkpoint: Path, make_gallery: Callable[..., Path]
) -> None:
    gallery = make_gallery(tmp_path / "gallery", n=6, corrupt=1, synthetic_split=None)
    with serve_files(gallery) as files, _ray_temp_dir() as ray_temp_dir:
        names = sorted(p.name for p in gallery.iterdir())
        image_list = tmp_path / "images.jsonl"
        image_list.write_text("".join(
            json.dumps({"image_id": Path(n).stem, "uri": f"{files.url}/{n}"}) + "\n" for n in names
        ))  # fmt: skip
        spec = {"image_list": str(image_list), "checkpoint": str(fake_checkpoint), "collection": "multinode",
                "query": "red", "work_dir": str(tmp_path), "ray_temp_dir": ray_temp_dir,
                "report": str(tmp_path / "report.json")}  # fmt: skip
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps(spec))
        done = _run_driver(spec_path)
        assert done.returncode == 0, done.stdout[-6000:]
        read_over_http = sorted(path.lstrip("/") for path in files.requests)
    report = json.loads(Path(spec["report"]).read_text())

    head, worker = report["head_node"], report["worker_node"]
    assert report["nodes"] == 2 and head != worker
    assert report["serve_env"] == LOCAL_RAY_SERVE_ENV  # HAProxy on the head, replicas on the worker
    # Every gallery image (the corrupt one too) was read over HTTP, for ingestion or the image route.
    assert set(read_over_http) == set(names)
    ingest = report["ingest"]
    assert (ingest["images"], ingest["failures"], ingest["instances"]) == (6, 1, 6 * 4)
    assert [d["image_id"] for d in ingest["dead_letter"]] == ["bad000"]

    encoders = _nodes_of(report, lambda a: "MapWorker" in a["class"] or "EncoderActor" in a["class"])
    assert encoders == {worker}, report["actors"]
    replicas = {a["class"].rsplit(":", 1)[-1]: a["node"] for a in report["actors"] if "ServeReplica" in a["class"]}
    assert replicas == {"Ingress": worker}  # search_in_ingress: the ingress replica encodes, searches, re-ranks

    results = report["search"]["results"]
    assert results[0]["image_id"] == "img000" and results[0]["uri"] == f"{files.url}/img000.jpg"
    assert report["image_type"] == "image/jpeg"
    assert report["image_sha"] == hashlib.sha256((gallery / "img000.jpg").read_bytes()).hexdigest()
    print("multinode timings:", report["timings"])
