"""Ray Serve end to end: real Serve, real HTTP, real milvus-lite, real tiny model / fake model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import requests
from ray import serve

from reir.client import Client
from reir.errors import ReirError
from reir.platform.modeling import load_reir_model
from reir.serving.app import build_app
from reir.serving.lifecycle import wait_until_routed
from tests.serving.conftest import COLLECTION, IMAGE_SIZE, FakeApp, fill_store


@pytest.fixture(scope="module")
def tiny_app(serve_url: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    db = tmp_path_factory.mktemp("serve") / "tiny.db"
    version = fill_store(db, tiny_checkpoint, load_reir_model)
    # Exactly what `serve run reir.serving.app:build_app key=value ...` passes: strings.
    app = build_app({
        "model_path": str(tiny_checkpoint), "milvus_uri": str(db), "milvus_collection": COLLECTION,
        "num_cpus_encoder": "0.25", "num_cpus_searcher": "0.1", "num_cpus_ingress": "0.1",
    })  # fmt: skip
    serve.run(app, name="tiny", route_prefix="/tiny")
    wait_until_routed(f"{serve_url}/tiny")
    yield f"{serve_url}/tiny", version
    serve.delete("tiny")


def test_search_over_http_with_the_tiny_model(tiny_app: tuple[str, str]) -> None:
    url, version = tiny_app
    resp = requests.post(f"{url}/v1/search", json={"query": "the red square on the left", "top_k": 5}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == version and body["took_ms"] > 0
    assert body["reranked"] is False  # the tiny model has no re-rank head (yet): ANN order
    assert {"encode", "search", "total"} <= set(body["timings_ms"])
    results = body["results"]
    assert 1 <= len(results) <= 5
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for r in results:
        x, y, w, h = r["box"]
        assert r["image_id"].startswith("img_") and r["uri"] == f"/g/{r['image_id']}.png"
        assert 0 <= x and 0 <= y and x + w <= IMAGE_SIZE[0] + 1e-3 and y + h <= IMAGE_SIZE[1] + 1e-3


def test_concurrent_queries_are_batched_and_all_answered(tiny_app: tuple[str, str]) -> None:
    url, _ = tiny_app
    queries = [f"object number {i}" for i in range(12)]

    def post(q: str) -> int:
        return requests.post(f"{url}/v1/search", json={"query": q, "top_k": 3}, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(post, queries))
    assert codes == [200] * len(queries)


def test_validation_and_health_over_http(tiny_app: tuple[str, str]) -> None:
    url, version = tiny_app
    bad_top_k = requests.post(f"{url}/v1/search", json={"query": "x", "top_k": 0}, timeout=30)
    assert bad_top_k.status_code == 422 and bad_top_k.json()["detail"][0]["field"] == "top_k"
    assert requests.post(f"{url}/v1/search", json={"query": "x", "top_k": 101}, timeout=30).status_code == 422
    unknown = requests.post(f"{url}/v1/search", json={"query": "x", "filter": "pk != ''"}, timeout=30)
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["field"] == "filter"
    huge = requests.post(f"{url}/v1/search", data=b'{"query": "' + b"a" * 20000 + b'"}', timeout=30,
                         headers={"content-type": "application/json"})
    assert huge.status_code == 413
    health = requests.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model_version": version}


def test_fake_app_keys_rank_discover_filters(fake_app: FakeApp) -> None:
    url, auth = fake_app.url, fake_app.search_headers
    assert requests.post(f"{url}/v1/search", json={"query": "yellow"}, timeout=30).status_code == 401
    assert requests.get(f"{url}/v1/admin/config", headers=auth, timeout=30).status_code == 403
    assert requests.get(f"{url}/v1/admin/config", headers=fake_app.admin_headers, timeout=30).status_code == 200
    resp = requests.post(f"{url}/v1/search", json={"query": "yellow", "top_k": 1}, headers=auth, timeout=60)
    assert resp.status_code == 200, resp.text
    (best,) = resp.json()["results"]
    assert best["image_id"] == "img_yellow" and best["box"] == [0.0, 0.0, 32.0, 24.0]
    # discover: every image whose best box reaches the checkpoint's threshold (0.1 in its calibration.json):
    # yellow itself and the images whose colour is one channel away from it (red, green, white)
    found = requests.post(f"{url}/v1/search", json={"query": "yellow", "mode": "discover"}, headers=auth, timeout=60)
    body = found.json()
    assert body["threshold"] == 0.1 and body["mode"] == "discover"
    assert body["results"][0]["image_id"] == "img_yellow"
    assert {r["image_id"] for r in body["results"]} == {"img_yellow", "img_red", "img_green", "img_white"}
    assert all(r["score"] >= 0.1 for r in body["results"])
    only = requests.post(f"{url}/v1/search", headers=auth, timeout=60, json={
        "query": "yellow", "top_k": 3, "filters": [{"field": "image_id", "op": "in", "value": ["img_red", "img_blue"]}]})
    assert {r["image_id"] for r in only.json()["results"]} <= {"img_red", "img_blue"} and only.json()["results"]
    injected = requests.post(f"{url}/v1/search", headers=auth, timeout=60, json={
        "query": "yellow", "filters": [{"field": "image_id", "op": "eq", "value": 'x" or image_id != "'}]})
    # the value is escaped into one literal: it names no image, so nothing matches (unescaped, it would match all)
    assert injected.status_code == 200 and injected.json()["results"] == []


def test_fake_app_streams_gallery_images(fake_app: FakeApp) -> None:
    url, auth = fake_app.url, fake_app.search_headers
    resp = requests.get(f"{url}/v1/images/img_red", headers=auth, timeout=30)
    assert resp.status_code == 200 and resp.content == (fake_app.gallery / "img_red.png").read_bytes()
    assert requests.get(f"{url}/v1/images/img_red", timeout=30).status_code == 401
    assert requests.get(f"{url}/v1/images/nope", headers=auth, timeout=30).status_code == 404
    traversal = requests.get(f"{url}/v1/images/..%2F..%2Fetc%2Fpasswd", headers=auth, timeout=30)
    assert traversal.status_code in (404, 422)


def test_python_client_against_the_service(fake_app: FakeApp) -> None:
    client = Client(fake_app.url, api_key="test-search-key")
    results = client.search("yellow", top_k=2, rerank=True)
    assert results[0]["image_id"] == "img_yellow"
    found = client.search_full("yellow", mode="discover", filters=[{"field": "image_id", "op": "eq", "value": "img_red"}])
    assert [r["image_id"] for r in found["results"]] == ["img_red"]
    with pytest.raises(ReirError, match="401"):
        Client(fake_app.url, api_key="wrong").search("yellow")


def test_reir_search_cli_against_the_service(fake_app: FakeApp) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "REIR_API_KEY": "test-search-key"}
    cmd = [sys.executable, "-m", "reir.cli", "search", "yellow", "--url", fake_app.url, "--top-k", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split()[2] == "img_yellow"
    res = subprocess.run([*cmd, "--discover", "--filters", '[{"field": "image_id", "op": "eq", "value": "img_red"}]'],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode == 0 and "1 image(s) at probability >= 0.100" in res.stdout and "img_red" in res.stdout
    res = subprocess.run([*cmd, "--filters", '[{"field": "pk", "op": "eq", "value": "x"}]'], capture_output=True,
                         text=True, timeout=120, env=env, check=False)
    assert res.returncode == 2 and "HTTP 422" in res.stderr and "not filterable" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _metric_lines(port: int) -> list[str]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [line for line in text.splitlines() if not line.startswith("#")]


def _search_requests(lines: list[str]) -> dict[str, float]:
    """``/v1/search`` requests counted so far, by status."""
    counts: dict[str, float] = {}
    for line in lines:
        if line.startswith("ray_reir_query_requests_total") and 'route="/v1/search"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _scrape(port: int, names: list[str], expected: dict[str, float], timeout_s: float = 60.0) -> dict[str, list[str]]:
    """Poll Ray's metrics port until every family in ``names`` has samples and the ``/v1/search``
    request counts reach ``expected`` (by status). Ray exports every ~10 s, each process on its
    own, so one count can arrive a flush before another."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = _metric_lines(port)
        found = {n: [line for line in lines if line.startswith(n)] for n in names}
        counts = _search_requests(lines)
        if all(found.values()) and all(counts.get(s, 0.0) >= n for s, n in expected.items()):
            return found
        if time.monotonic() > deadline:
            missing = [n for n, v in found.items() if not v]
            raise AssertionError(f"metrics missing {missing} or search requests {counts} < {expected}")
        time.sleep(2)


def test_metrics_are_exported_on_rays_metrics_port(fake_app: FakeApp) -> None:
    url, auth = fake_app.url, fake_app.search_headers
    port = ray.nodes()[0]["MetricsExportPort"]
    before = _search_requests(_metric_lines(port))  # earlier tests of the module searched too
    for i in range(5):
        assert requests.post(f"{url}/v1/search", json={"query": f"red {i}"}, headers=auth, timeout=60).status_code == 200
    assert requests.post(f"{url}/v1/search", json={"query": "red", "top_k": 0}, headers=auth, timeout=60).status_code == 422
    found = _scrape(port, [
        "ray_reir_query_requests_total", "ray_reir_query_latency_seconds_bucket",
        "ray_reir_query_stage_latency_seconds_bucket", "ray_reir_query_candidates_bucket",
        "ray_reir_query_encode_batch_size_bucket", "ray_reir_query_search_latency_seconds_count",
        "ray_reir_query_memory_index_rows", "ray_reir_query_memory_index_recall",
    ], expected={"200": before.get("200", 0.0) + 5, "422": before.get("422", 0.0) + 1})  # fmt: skip
    # milvus-lite: the searcher answers from its in-memory index (memory_index auto), loaded at start
    assert max(float(line.rsplit(" ", 1)[1]) for line in found["ray_reir_query_memory_index_rows"]) > 0
    # a small collection: the index scans every row, so its recall is 1
    assert {float(line.rsplit(" ", 1)[1]) for line in found["ray_reir_query_memory_index_recall"]} == {1.0}
    requests_lines = found["ray_reir_query_requests_total"]
    assert any('status="200"' in line for line in requests_lines)
    assert any('status="422"' in line and 'route="/v1/search"' in line for line in requests_lines)
    stages = {s for s in ("encode", "search", "total") if any(f'stage="{s}"' in x for x in
                                                                   found["ray_reir_query_stage_latency_seconds_bucket"])}
    assert stages == {"encode", "search", "total"}
    # every ok search observed its candidates once: the +Inf bucket counts them
    inf = [line for line in found["ray_reir_query_candidates_bucket"] if 'le="+Inf"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in inf) >= 5


def test_one_deployment_serves_the_in_process_answers(serve_url: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The default topology (``search_in_ingress``): the ingress replica holds the searcher, which
    encodes, searches, fetches the context and re-ranks with no Ray hop, and HTTP answers what
    the in-process pipeline answers. (Ingress + Searcher: the ``fake_app`` tests; all three
    apart: the autoscale and live-metrics tests.)"""
    import asyncio

    from reir.model import create_model
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.app import app_for
    from reir.serving.pipeline import QueryRequest, local_pipeline

    model, processor = create_model(str(tiny_checkpoint))
    model.add_reranker(hidden_size=16, num_relations=4)  # a re-ranking model: the whole path runs
    ckpt = tmp_path / "rerank-ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    db = tmp_path / "fused.db"
    fill_store(db, ckpt, load_reir_model)
    cfg = ServeConfig(model_path=str(ckpt), milvus=MilvusConfig(uri=str(db), collection=COLLECTION),
                      num_cpus_searcher=0.1)  # fmt: skip
    queries = ["the red square", "a blue thing left of the green one", "yellow"]
    local = local_pipeline(cfg)
    try:
        expected = [asyncio.run(local.run(QueryRequest(q, top_k=4))) for q in queries]
    finally:
        local.stages.store.close()  # type: ignore[attr-defined]  # the replica opens the file next
    assert all(o.reranked for o in expected)
    serve.run(app_for(cfg), name="fused", route_prefix="/fused")
    wait_until_routed(f"{serve_url}/fused")
    try:
        assert set(serve.status().applications["fused"].deployments) == {"Ingress"}
        client = Client(f"{serve_url}/fused")
        for q, want in zip(queries, expected, strict=True):
            body = client.search_full(q, top_k=4)
            assert body["reranked"] is True and {"encode", "search", "ann", "context", "rerank"} <= set(body["timings_ms"])
            got = [(r["image_id"], r["box"]) for r in body["results"]]
            assert got == [(r.image_id, list(r.box)) for r in want.results]
            assert [r["score"] for r in body["results"]] == pytest.approx([r.score for r in want.results], abs=1e-5)
    finally:
        serve.delete("fused")
