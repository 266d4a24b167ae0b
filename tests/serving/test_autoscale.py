"""Autoscaling from ServeConfig: load over HTTP scales the encoder up, idleness scales it down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
from ray import serve

from reir.platform.config import AutoscalingSpec, MilvusConfig, ServeConfig
from reir.serving.app import app_for
from reir.serving.lifecycle import wait_until_routed
from tests.platform.fakes import fake_loader
from tests.serving.conftest import COLLECTION, fill_store
from tests.serving.slow_model import slow_loader

APP = "autoscale"


def _running(deployment: str) -> int:
    status = serve.status().applications[APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait_for(predicate: object, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.mark.slow
def test_encoder_scales_up_under_load_and_back_down(serve_url: str, fake_checkpoint: Path, tmp_path: Path) -> None:
    fill_store(tmp_path / "a.db", fake_checkpoint, fake_loader)
    spec = AutoscalingSpec(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                           downscale_delay_s=4, metrics_interval_s=0.5, look_back_period_s=2)
    cfg = ServeConfig(
        model_path=str(fake_checkpoint), milvus=MilvusConfig(uri=str(tmp_path / "a.db"), collection=COLLECTION),
        num_cpus_encoder=0.1, num_cpus_searcher=0.1, num_cpus_ingress=0.1,
        max_batch_size=1, autoscaling={"encoder": spec}, encode_in_searcher=False,
        search_in_ingress=False,
    )  # fmt: skip
    serve.run(app_for(cfg, loader=slow_loader), name=APP, route_prefix=f"/{APP}")
    wait_until_routed(f"{serve_url}/{APP}")
    url = f"{serve_url}/{APP}/v1/search"
    try:
        assert _running("QueryEncoder") == 1
        stop = threading.Event()
        codes: list[int] = []

        def client() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    codes.append(session.post(url, json={"query": "red", "top_k": 1}, timeout=60).status_code)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            _wait_for(lambda: _running("QueryEncoder") >= 2, 90, "a second encoder replica")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert codes and set(codes) == {200}
        assert _running("Searcher") == 1  # only the configured deployment autoscales
        _wait_for(lambda: _running("QueryEncoder") == 1, 90, "scale back down to one encoder")
        assert requests.post(url, json={"query": "red", "top_k": 1}, timeout=60).status_code == 200
    finally:
        serve.delete(APP)
