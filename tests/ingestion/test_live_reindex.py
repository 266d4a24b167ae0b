"""Zero-downtime re-index: Serve answers over HTTP (milvus-lite server mode) while a new version is
built and the alias switched; every query keeps returning 200 and the switch is seen without a restart."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import requests
from ray import serve

from reir.ingestion.pipeline import run_ingestion
from reir.platform.config import IngestConfig, MilvusConfig, ServeConfig
from reir.platform.milvus_server import EmbeddedMilvus, free_port
from reir.serving.app import app_for
from reir.serving.lifecycle import wait_until_routed
from tests.platform.fakes import fake_loader


def _cfg(root: Path, ckpt: Path, uri: str, **extra: object) -> IngestConfig:
    fields: dict[str, object] = {
        "gallery_root": root, "split": None, "model_path": str(ckpt), "alias": "reir_live", "top_k_instances": 2,
        "milvus": MilvusConfig(uri=uri, collection="gal", index_type="HNSW"),
        "batch_size": 2, "num_encoders": 1, "num_cpus_per_encoder": 0.5,
    }  # fmt: skip
    return IngestConfig.model_validate({**fields, **extra})


def test_queries_keep_succeeding_while_a_new_version_is_ingested_and_promoted(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    old = make_gallery(tmp_path / "old", n=4, corrupt=0, synthetic_split=None)
    new = make_gallery(tmp_path / "new", n=12, corrupt=0, synthetic_split=None)
    for path in new.iterdir():
        path.rename(path.with_name("v2_" + path.name))
    port = free_port()
    with EmbeddedMilvus(tmp_path / "live.db") as milvus:
        first = run_ingestion(_cfg(old, fake_checkpoint, milvus.uri), loader=fake_loader)
        assert first.promoted
        serve_cfg = ServeConfig.model_validate({
            "model_path": str(fake_checkpoint), "milvus": {"uri": milvus.uri},  # default collection: reir_live
            "num_cpus_encoder": 0.25, "num_cpus_searcher": 0.25, "num_cpus_ingress": 0.25,
        })  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_for(serve_cfg, loader=fake_loader), name="live", route_prefix="/live")
        wait_until_routed(f"http://127.0.0.1:{port}/live")
        url = f"http://127.0.0.1:{port}/live/v1/search"
        statuses: list[int] = []
        answers: list[list[str]] = []
        stop = threading.Event()

        def query_loop() -> None:
            while not stop.is_set():
                res = requests.post(url, json={"query": "the red one", "top_k": 3}, timeout=30)
                statuses.append(res.status_code)
                if res.status_code == 200:
                    answers.append([r["image_id"] for r in res.json()["results"]])

        try:
            warm = requests.post(url, json={"query": "the red one", "top_k": 3}, timeout=60)
            assert warm.status_code == 200
            assert all(not r["image_id"].startswith("v2_") for r in warm.json()["results"])
            worker = threading.Thread(target=query_loop, daemon=True)
            worker.start()
            second = run_ingestion(_cfg(new, fake_checkpoint, milvus.uri, rebuild=True), loader=fake_loader)
            assert second.promoted and second.collection != first.collection
            after = len(answers)
            while len(answers) < after + 3 and worker.is_alive():  # a few queries after the switch
                stop.wait(0.2)
        finally:
            stop.set()
            serve.shutdown()  # the next module starts Serve's proxy on its own port
        assert len(statuses) >= 5 and set(statuses) == {200}, statuses
        # the searcher reads the alias: answers switch to the new version without a restart
        assert answers[-1] and all(i.startswith("v2_") for i in answers[-1])
        assert any(a and not a[0].startswith("v2_") for a in answers[:after])
