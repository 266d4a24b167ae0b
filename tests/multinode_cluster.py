"""Driver of tests/test_multinode.py: ingest and serve on a two-node Ray cluster, report where.

Run as ``python -m tests.multinode_cluster SPEC.json`` in its own process, so its Ray never
meets the test session's. It starts a real two-node cluster on this machine with Ray's own
``ray.cluster_utils.Cluster`` (a head and a worker, each its own raylet and object store):

- the head has one CPU and a ``gallery`` resource: it is where the driver lists the image
  list and where the milvus-lite server runs;
- the worker has more CPUs and a ``remote`` resource, which the encoder actors
  (``IngestConfig.encoder_resources``) and every Serve replica (``ServeConfig.replica_resources``)
  ask for, so they land there (and only there), seeing the gallery only as the ``http://``
  URIs of the image list.

It then ingests the image list into the shared milvus-lite server, serves the app (HTTP
proxy on the head), asks one search and one image over HTTP, and writes a JSON report: the
node ids, the actors with the node each ran on, the ingestion summary and the answers.
Every process it starts (raylets, GCS, workers, milvus-lite) is stopped before it exits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HEAD_CPUS, HEAD_RESOURCES = 1, {"gallery": 1.0}
WORKER_CPUS, WORKER_RESOURCES = 4, {"remote": 8.0}
PIN = {"remote": 1.0}  # what each encoder actor and each replica asks for


def _http_json(url: str, body: dict[str, Any] | None = None, timeout_s: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _http_bytes(url: str, timeout_s: float = 60.0) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read(), response.headers.get("Content-Type", "")


def _actors() -> list[dict[str, str]]:
    """Every actor of the cluster (alive or finished) and the node it ran on.

    The GCS actor table (a developer API), not ``ray.util.state``: that one needs the
    dashboard, which this cluster does not start, to save its start-up time and CPU.
    """
    from ray._private import state

    return [
        {"class": str(a.get("ActorClassName", "")), "name": str(a.get("Name", "")),
         "node": str((a.get("Address") or {}).get("NodeID", "")), "state": str(a.get("State", ""))}
        for a in state.actors().values()
    ]  # fmt: skip


def _cpu_seconds() -> float:
    """CPU seconds used so far by this driver's session: the driver, the milvus-lite server and
    every live process of the cluster (the test starts the driver as a session leader; Ray's
    processes stay in its session). Workers that already exited are not counted. On a shared
    2-core machine this, not the wall time, is what the test costs."""
    import os

    if os.getsid(0) != os.getpid():  # run by hand from a shell: the session is the shell's
        return float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:2])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == os.getpid():  # session id
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return round(total, 1)


def _ingest(spec: dict[str, Any], milvus_uri: str) -> dict[str, Any]:
    from reir.ingestion.pipeline import run_ingestion
    from reir.platform.config import IngestConfig
    from tests.platform.fakes import fake_loader

    cfg = IngestConfig(
        image_list=Path(spec["image_list"]), model_path=spec["checkpoint"], split=None,
        milvus={"uri": milvus_uri, "collection": spec["collection"]}, batch_size=4, num_encoders=1,
        num_cpus_per_encoder=1.0, write_concurrency=1, check_samples=0, encoder_resources=PIN,
    )  # fmt: skip
    return run_ingestion(cfg, loader=fake_loader).to_dict()


def _serve_and_ask(spec: dict[str, Any], milvus_uri: str) -> dict[str, Any]:
    from ray import serve

    from reir.platform.config import ServeConfig
    from reir.platform.milvus_server import free_port
    from reir.serving.app import app_for
    from reir.serving.lifecycle import wait_until_routed
    from tests.platform.fakes import fake_loader

    port = free_port()
    cfg = ServeConfig(
        model_path=spec["checkpoint"], milvus={"uri": milvus_uri, "collection": spec["collection"]},
        host="127.0.0.1", port=port, num_cpus_encoder=0.5, num_cpus_searcher=0.5,
        num_cpus_ingress=0.25, replica_resources=PIN,
    )  # fmt: skip
    # One proxy, on the head: proxies on both nodes would bind the same port of this machine.
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": port})
    serve.run(app_for(cfg, loader=fake_loader), name=cfg.app_name, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_until_routed(base)  # HAProxy picks the route up a moment after serve.run returns
    answer = _http_json(f"{base}/v1/search", {"query": spec["query"], "top_k": 3})
    top = answer["results"][0]["image_id"] if answer["results"] else ""
    image, media_type = _http_bytes(f"{base}/v1/images/{top}") if top else (b"", "")
    return {"search": answer, "image_bytes": len(image), "image_sha": _sha(image), "image_type": media_type}


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from reir.platform.milvus_server import EmbeddedMilvus
    from reir.platform.raylocal import LOCAL_RAY_SERVE_ENV, use_serve_data_plane

    use_serve_data_plane()  # the nodes start with the data plane reir's own Ray has: HAProxy on the head
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "resources": HEAD_RESOURCES, "temp_dir": spec["ray_temp_dir"], "include_dashboard": False,
    })  # fmt: skip
    try:
        worker = cluster.add_node(num_cpus=WORKER_CPUS, resources=WORKER_RESOURCES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        timings["cluster_s"] = time.perf_counter() - start
        report: dict[str, Any] = {"head_node": cluster.head_node.node_id, "worker_node": worker.node_id,
                                  "nodes": len([n for n in ray.nodes() if n["Alive"]]),
                                  "serve_env": {k: os.environ.get(k) for k in LOCAL_RAY_SERVE_ENV}}  # fmt: skip
        mark = time.perf_counter()
        with EmbeddedMilvus(Path(spec["work_dir"]) / "milvus.db") as milvus:
            timings["milvus_s"] = time.perf_counter() - mark
            mark = time.perf_counter()
            report["ingest"] = _ingest(spec, milvus.uri)
            timings["ingest_s"] = time.perf_counter() - mark
            mark = time.perf_counter()
            report.update(_serve_and_ask(spec, milvus.uri))
            timings["serve_and_ask_s"] = time.perf_counter() - mark
            report["actors"] = _actors()
            timings["cpu_s"] = _cpu_seconds()
        return {**report, "timings": timings}
    finally:
        ray.shutdown()
        # Not cluster.shutdown(): it also deletes /tmp/ray/ray_current_cluster, which may name
        # another Ray of this machine. Killing the nodes' processes ends Serve's replicas too.
        for node in [*cluster.worker_nodes, cluster.head_node]:
            if node is not None:
                cluster.remove_node(node, allow_graceful=False)
        _forget_address(cluster.address)


def _forget_address(address: str) -> None:
    """The head wrote its address to /tmp/ray/ray_current_cluster, where a later plain
    ``ray.init()`` of this machine would try to join the dead cluster: remove the file, but only
    while it still names this cluster."""
    marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if marker.read_text().strip() == address:
            marker.unlink()
    except OSError:
        pass


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    started = time.perf_counter()
    report = run(spec)
    report["timings"]["driver_s"] = time.perf_counter() - started
    Path(spec["report"]).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
