"""The FastAPI app over a stub backend: wire format, limits, filters, auth, images, page."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reir.errors import DependencyUnavailable
from reir.limits import MAX_TOP_K
from reir.platform.auth import KeyRing, hash_key
from reir.platform.config import ApiKeySpec
from reir.platform.filters import allowed_fields
from reir.serving.http import HttpSettings, create_http_app
from reir.serving.pipeline import QueryOutcome, QueryRequest
from reir.serving.retriever import Result


class StubBackend:
    def __init__(self, healthy: bool = True, uris: dict[str, str] | None = None) -> None:
        self.healthy = healthy
        self.calls: list[QueryRequest] = []
        self.uris = uris or {}

    async def run(self, request: QueryRequest) -> QueryOutcome:
        self.calls.append(request)
        results = [Result(f"img{i}", f"/g/img{i}.jpg", (1.0, 2.0, 3.0, 4.0), 0.9 - i / 10) for i in range(request.top_k)]
        discover = request.mode == "discover"
        return QueryOutcome(results=results, model_version="stub-1", mode=request.mode, reranked=request.rerank,
                            threshold=0.5 if discover else None, candidates=7,
                            timings_ms={"encode": 1.0, "search": 2.0, "total": 3.5},
                            total=50 if discover else None, next_offset=request.offset + request.top_k)

    async def info(self) -> dict[str, Any]:
        return {"model_version": "stub-1", "discover_threshold": 0.5, "can_rerank": False}

    async def health(self) -> dict[str, Any]:
        if not self.healthy:
            raise ConnectionError("milvus down")
        return {"model_version": "stub-1"}

    async def image_uri(self, image_id: str) -> str | None:
        return self.uris.get(image_id)


class ListMetrics:
    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []

    def record(self, route: str, status: int, seconds: float) -> None:
        self.records.append((route, status))


SETTINGS = HttpSettings(max_top_k=100, max_body_bytes=2048, filter_fields=allowed_fields({"split": "str", "year": "int"}))


@pytest.fixture
def backend() -> StubBackend:
    return StubBackend()


@pytest.fixture
def metrics() -> ListMetrics:
    return ListMetrics()


@pytest.fixture
def client(backend: StubBackend, metrics: ListMetrics) -> TestClient:
    return TestClient(create_http_app(backend, settings=SETTINGS, metrics=metrics))


def test_search_returns_the_wire_format(client: TestClient, backend: StubBackend, metrics: ListMetrics) -> None:
    resp = client.post("/v1/search", json={"query": "  the red square  ", "top_k": 2})
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"results", "model_version", "mode", "reranked", "threshold", "gate", "candidates", "timings_ms",
                         "took_ms", "truncated", "total", "next_offset"}
    assert body["truncated"] is False and body["total"] is None and body["next_offset"] == 2
    assert body["model_version"] == "stub-1" and body["mode"] == "rank" and body["threshold"] is None
    assert body["results"][0] == {"image_id": "img0", "uri": "/g/img0.jpg", "box": [1.0, 2.0, 3.0, 4.0], "score": 0.9,
                                  "refined": False}
    assert body["timings_ms"]["total"] == 3.5 and body["candidates"] == 7
    assert backend.calls[0] == QueryRequest("the red square", 2, "rank", True, ())  # stripped, rerank by default
    assert len(client.post("/v1/search", json={"query": "x"}).json()["results"]) == 10  # default top_k
    assert metrics.records[0] == ("/v1/search", 200)


def test_mode_rerank_and_filters_reach_the_backend(client: TestClient, backend: StubBackend) -> None:
    resp = client.post("/v1/search", json={
        "query": "a cat", "top_k": 3, "mode": "discover", "rerank": False,
        "filters": [{"field": "split", "op": "eq", "value": "test"},
                    {"field": "image_id", "op": "in", "value": ["syn1", "syn2"]},
                    {"field": "year", "op": "ge", "value": 2020},
                    {"field": "uri", "op": "prefix", "value": "/data/gallery_a/"}],
    })  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.json()["mode"] == "discover" and resp.json()["threshold"] == 0.5
    assert resp.json()["total"] == 50 and resp.json()["next_offset"] == 3
    request = backend.calls[0]
    assert request.offset == 0
    assert client.post("/v1/search", json={"query": "a cat", "mode": "discover", "offset": 30}).json()["next_offset"] == 40
    assert backend.calls[1].offset == 30
    assert request.mode == "discover" and request.rerank is False
    assert [c.to_expr() for c in request.conditions] == [
        'split == "test"', 'image_id in ["syn1", "syn2"]', "year >= 2020", 'uri like "/data/gallery\\\\_a/%"',
    ]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 101}, "top_k"),
        ({"query": "x", "top_k": "5"}, "top_k"),
        ({"query": "x", "top_k": 2.5}, "top_k"),
        ({"query": "x", "top_k": True}, "top_k"),
        ({"query": "x", "limit": 5}, "limit"),
        ({"query": "x", "offset": -1}, "offset"),
        ({"query": "x", "offset": 16_385}, "offset"),
        ({"query": "x", "offset": "10"}, "offset"),
        ({"top_k": 5}, "query"),
        ({"query": "   "}, "query"),
        ({"query": 42}, "query"),
        ({"query": "a\x00b"}, "query"),
        ({"query": "x" * 501}, "query"),
        ({"query": "x", "mode": "all"}, "mode"),
        ({"query": "x", "rerank": "yes"}, "rerank"),
        ({"query": "x", "filter": "pk != ''"}, "filter"),
        ({"query": "x", "filters": "image_id == 'a'"}, "filters"),
        ({"query": "x", "filters": [{"field": "pk", "op": "ne", "value": ""}]}, "filters"),
        ({"query": "x", "filters": [{"field": "image_id", "op": "eq", "value": "a\u0007"}]}, "filters"),
        ({"query": "x", "filters": [{"field": "image_id", "op": "eq", "value": ""}]}, "filters"),
        ({"query": "x", "filters": [{"field": "image_id", "op": "lt", "value": "a"}]}, "filters"),
        ({"query": "x", "filters": [{"field": "image_id", "op": "eq", "value": ["a"]}]}, "filters"),
        ({"query": "x", "filters": [{"field": "year", "op": "eq", "value": "2020"}]}, "filters"),
        ({"query": "x", "filters": [{"field": "year", "op": "eq", "value": 2**70}]}, "filters"),
        ({"query": "x", "filters": [{"field": "split", "op": "eq", "value": "a", "raw": "1"}]}, "filters.0.raw"),
        ({"query": "x", "filters": [{"field": "split", "op": "regex", "value": "a"}]}, "filters.0.op"),
        ({"query": "x", "filters": [{"field": "split", "op": "eq", "value": "a"}] * 17}, "filters"),
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


def test_oversized_bodies_are_413_with_or_without_content_length(client: TestClient, backend: StubBackend,
                                                                 metrics: ListMetrics) -> None:
    big = b'{"query": "' + b"x" * 4000 + b'"}'
    assert client.post("/v1/search", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks() -> Any:
        for _ in range(8):
            yield b" " * 1000

    resp = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json() == {"error": "request body too large"}
    assert backend.calls == [] and metrics.records == [("/v1/search", 413), ("/v1/search", 413)]


def _key_client(backend: StubBackend, *, burst: int = 3) -> TestClient:
    ring = KeyRing(
        [ApiKeySpec(name="app", sha256=hash_key("k-search")),
         ApiKeySpec(name="ops", sha256=hash_key("k-admin"), scopes=("search", "admin"))],
        rate_per_s=0.01, burst=burst,
    )  # fmt: skip
    return TestClient(create_http_app(backend, settings=SETTINGS, keyring=ring))


def test_api_keys_401_403_and_rate_limit_429(backend: StubBackend) -> None:
    client = _key_client(backend)
    body = {"query": "red", "top_k": 1}
    missing = client.post("/v1/search", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/search", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v1/search", json=body, headers={"Authorization": "Basic k-search"}).status_code == 401
    search_key = {"Authorization": "Bearer k-search"}
    assert client.get("/v1/admin/config", headers=search_key).status_code == 403
    admin = client.get("/v1/admin/config", headers={"Authorization": "Bearer k-admin"})
    assert admin.status_code == 200 and admin.json()["caller"] == "ops"
    # burst 3, then the bucket (0.01/s) is empty; the 403 above spent nothing.
    codes = [client.post("/v1/search", json=body, headers=search_key).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client.post("/v1/search", json=body, headers=search_key)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # other keys have their own bucket; the page and the probe need no key
    assert client.post("/v1/search", json=body, headers={"Authorization": "Bearer k-admin"}).status_code == 200
    assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200
    assert len(backend.calls) == 4


def test_no_keys_means_auth_off(client: TestClient) -> None:
    assert client.post("/v1/search", json={"query": "x"}, headers={"Authorization": "Bearer anything"}).status_code == 200
    assert client.get("/v1/admin/config").status_code == 200
    assert client.get("/v1/info").json()["auth"] is False


def test_images_are_streamed_only_from_inside_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "gallery"
    root.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "a.png")
    (tmp_path / "secret.png").write_bytes(b"not for you")
    (root / "notes.txt").write_text("text")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    uris = {"a": str(root / "a.png"), "out": str(tmp_path / "secret.png"), "dots": str(root / ".." / "secret.png"),
            "txt": str(root / "notes.txt"), "link": str(root / "link.png")}
    settings = HttpSettings(image_roots=(root.resolve(),))
    client = TestClient(create_http_app(StubBackend(uris=uris), settings=settings))
    resp = client.get("/v1/images/a")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.content == (root / "a.png").read_bytes()
    for image_id in ("out", "dots", "txt", "link", "missing"):
        assert client.get(f"/v1/images/{image_id}").status_code == 404, image_id
    for bad in ("..%2F..%2Fetc%2Fpasswd", "a%00", "a b"):
        assert client.get(f"/v1/images/{bad}").status_code in (404, 422), bad


def test_search_page_has_the_form(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    for part in ('id="q"', 'id="discover"', "v1/search", "v1/images/", '"rect"', "createElementNS"):
        assert part in resp.text, part


def test_healthz_and_metric_labels(backend: StubBackend, metrics: ListMetrics) -> None:
    client = TestClient(create_http_app(backend, metrics=metrics))
    assert client.get("/healthz").json() == {"status": "ok", "model_version": "stub-1"}
    backend.healthy = False
    resp = client.get("/healthz")
    assert resp.status_code == 503 and "milvus down" in resp.json()["error"]
    assert client.get("/wp-admin/../x").status_code == 404
    assert client.get("/v1/images/zzz").status_code == 404
    assert metrics.records == [("/healthz", 200), ("/healthz", 503), ("other", 404), ("/v1/images", 404)]


def test_openapi_spec_lists_the_versioned_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/search/batch", "/v1/images/{image_id}", "/v1/info", "/v1/admin/config", "/healthz",
            "/livez", "/readyz", "/"} <= set(spec["paths"])
    for route in ("/v1/search", "/v1/search/batch"):
        assert {"401", "403", "413", "422", "429", "500", "503"} <= set(spec["paths"][route]["post"]["responses"])


class Failing(StubBackend):
    """A backend whose answer depends on the query: "down" -> a dependency is down, "bug" -> a bug."""

    async def run(self, request: QueryRequest) -> QueryOutcome:
        if request.query == "down":
            raise DependencyUnavailable("Milvus unavailable: MilvusUnavailableException", retry_after_s=2.5)
        if request.query == "bug":
            raise KeyError("calibration")
        return await super().run(request)


def test_a_dependency_down_is_503_with_retry_after(metrics: ListMetrics) -> None:
    client = TestClient(create_http_app(Failing(), metrics=metrics))
    resp = client.post("/v1/search", json={"query": "down"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "3"
    body = resp.json()
    assert body["retry_after_s"] == 3 and "Milvus unavailable" in body["reason"] and body["request_id"]
    assert metrics.records == [("/v1/search", 503)]


def test_a_bug_is_500_with_a_request_id_in_body_and_log(metrics: ListMetrics, caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(create_http_app(Failing(), metrics=metrics))
    with caplog.at_level(logging.ERROR, logger="reir.serving.http"):
        resp = client.post("/v1/search", json={"query": "bug"})
    assert resp.status_code == 500 and "Retry-After" not in resp.headers
    body = resp.json()
    assert body == {"error": "internal error", "request_id": resp.headers["X-Request-ID"]}
    assert "calibration" not in resp.text  # internals stay in the log
    (record,) = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert metrics.records == [("/v1/search", 500)]


def test_livez_never_touches_the_backend_and_readyz_does(backend: StubBackend) -> None:
    client = TestClient(create_http_app(backend))
    backend.healthy = False
    assert client.get("/livez").json() == {"status": "alive"}
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.json()["error"] == "milvus down" and resp.headers["Retry-After"]
    backend.healthy = True
    assert client.get("/readyz").json() == {"status": "ok", "model_version": "stub-1"}


def test_batch_answers_each_query_on_its_own(metrics: ListMetrics) -> None:
    client = TestClient(create_http_app(Failing(), settings=SETTINGS, metrics=metrics))
    queries = [{"query": "red", "top_k": 2}, {"query": "down"}, {"query": "bug"}, {"query": "x", "top_k": 0},
               {"query": "y", "filters": [{"field": "nope", "op": "eq", "value": 1}]}, {"query": "z", "colour": 1}]
    resp = client.post("/v1/search/batch", json={"queries": queries})
    assert resp.status_code == 200
    items = resp.json()["responses"]
    assert [i["status"] for i in items] == [200, 503, 500, 422, 422, 422]
    assert [r["image_id"] for r in items[0]["result"]["results"]] == ["img0", "img1"]
    assert items[1]["request_id"] and items[2]["error"] == "internal error"
    assert items[3]["detail"][0]["field"] == "top_k" and items[5]["detail"][0]["field"] == "colour"
    assert items[4]["detail"][0]["field"] == "filters"
    assert metrics.records == [("/v1/search/batch", 200)]


@pytest.mark.parametrize("body", [{"queries": []}, {"queries": [{"query": "a"}] * 17}, {"queries": "a"}, {"q": []}])
def test_malformed_batches_are_422(client: TestClient, body: dict) -> None:
    resp = client.post("/v1/search/batch", json=body)
    assert resp.status_code == 422 and resp.json()["error"] == "invalid request"


def test_the_shared_top_k_limit_is_the_serve_default() -> None:
    from reir.platform.config import ServeConfig

    assert ServeConfig.model_fields["max_top_k"].default == MAX_TOP_K == HttpSettings().max_top_k


def test_a_stage_error_wrapped_by_ray_shows_the_stage_message_not_rays(metrics: ListMetrics) -> None:
    from ray.exceptions import RayTaskError

    def wrapped() -> Exception:  # what a handle call raises when the Searcher replica raised
        cause = DependencyUnavailable("collection 'gal' is gone", retry_after_s=5.0)
        return RayTaskError("ray::ServeReplica:app:Searcher.ping() (pid=1)", "Traceback ...", cause).as_instanceof_cause()

    class Wrapped(StubBackend):
        async def run(self, request: QueryRequest) -> QueryOutcome:
            raise wrapped()

        async def health(self) -> dict[str, Any]:
            raise wrapped()

    client = TestClient(create_http_app(Wrapped(), metrics=metrics))
    resp = client.post("/v1/search", json={"query": "x"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert resp.json()["reason"] == "collection 'gal' is gone" and "ServeReplica" not in resp.text
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"] == "collection 'gal' is gone"
