from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from reir.serving.http import SearchOutcome, create_http_app
from reir.serving.retriever import Result


class StubBackend:
    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.calls: list[tuple[str, int]] = []

    async def search(self, query: str, top_k: int) -> SearchOutcome:
        self.calls.append((query, top_k))
        results = [Result(f"img{i}", f"/g/img{i}.jpg", (1.0, 2.0, 3.0, 4.0), 0.9 - i / 10) for i in range(top_k)]
        return SearchOutcome(results=results, model_version="stub-1")

    async def health(self) -> dict[str, Any]:
        if not self.healthy:
            raise ConnectionError("milvus down")
        return {"model_version": "stub-1"}


class ListMetrics:
    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []

    def record(self, route: str, status: int, seconds: float) -> None:
        self.records.append((route, status))


@pytest.fixture
def backend() -> StubBackend:
    return StubBackend()


@pytest.fixture
def metrics() -> ListMetrics:
    return ListMetrics()


@pytest.fixture
def client(backend: StubBackend, metrics: ListMetrics) -> TestClient:
    return TestClient(create_http_app(backend, max_top_k=100, metrics=metrics))


def test_search_returns_the_wire_format(client: TestClient, backend: StubBackend, metrics: ListMetrics) -> None:
    resp = client.post("/v1/search", json={"query": "  the red square  ", "top_k": 2})
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"results", "model_version", "took_ms"} and body["model_version"] == "stub-1"
    assert body["results"][0] == {"image_id": "img0", "uri": "/g/img0.jpg", "box": [1.0, 2.0, 3.0, 4.0], "score": 0.9}
    assert backend.calls == [("the red square", 2)]  # stripped
    assert client.post("/v1/search", json={"query": "x"}).json()["results"].__len__() == 10  # default top_k
    assert metrics.records[0] == ("/v1/search", 200)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 101}, "top_k"),
        ({"query": "x", "top_k": "5"}, "top_k"),
        ({"query": "x", "top_k": 2.5}, "top_k"),
        ({"query": "x", "top_k": True}, "top_k"),
        ({"query": "x", "limit": 5}, "limit"),
        ({"top_k": 5}, "query"),
        ({"query": "   "}, "query"),
        ({"query": 42}, "query"),
        ({"query": "a\x00b"}, "query"),
        ({"query": "x" * 1001}, "query"),
    ],
)
def test_invalid_requests_are_422_with_field_messages(client: TestClient, payload: dict, field: str) -> None:
    resp = client.post("/v1/search", json=payload)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert resp.json()["error"] == "invalid request"
    assert any(d["field"] == field and d["message"] for d in detail), detail


def test_non_json_body_is_422(client: TestClient) -> None:
    resp = client.post("/v1/search", content=b"not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422


def test_healthz_and_metric_labels(backend: StubBackend, metrics: ListMetrics) -> None:
    client = TestClient(create_http_app(backend, metrics=metrics))
    assert client.get("/healthz").json() == {"status": "ok", "model_version": "stub-1"}
    backend.healthy = False
    resp = client.get("/healthz")
    assert resp.status_code == 503 and "milvus down" in resp.json()["error"]
    assert client.get("/wp-admin/../x").status_code == 404
    assert metrics.records == [("/healthz", 200), ("/healthz", 503), ("other", 404)]
