"""The Python client's retry policy against a real local HTTP server that answers from a script."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reir.client import Client, RetryPolicy, ServiceError, retry_after_seconds
from reir.errors import DependencyUnavailable
from reir.platform.milvus_server import free_port

OK = (200, {}, {"results": [{"image_id": "a"}], "model_version": "v"})


class Scripted:
    """A real HTTP server: answers the n-th request with ``script[n]`` (the last one repeats)
    and records when each request arrived."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict]]) -> None:
        self.script = script
        self.seen: list[tuple[str, str, float]] = []
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.bodies.append(self.rfile.read(length))
                outer.seen.append((self.command, self.path, time.monotonic()))
                status, headers, body = outer.script[min(len(outer.seen), len(outer.script)) - 1]
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    made: list[Scripted] = []

    def make(script: list[tuple[int, dict[str, str], dict]]) -> Scripted:
        made.append(Scripted(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


FAST = RetryPolicy(max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05, deadline_s=10)


def test_a_503_with_retry_after_is_retried_after_that_wait(scripted: Callable[..., Scripted]) -> None:
    server = scripted([(503, {"Retry-After": "1"}, {"error": "down", "request_id": "r1"}), OK])
    results = Client(server.url, retry=FAST).search("the red mug")
    assert results == [{"image_id": "a"}]
    (_, _, first), (method, path, second) = server.seen
    assert (method, path) == ("POST", "/v1/search")
    assert second - first >= 0.95  # the server's Retry-After, not the policy's 10 ms backoff


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 429, 500])
def test_4xx_and_500_are_never_retried(scripted: Callable[..., Scripted], status: int) -> None:
    server = scripted([(status, {"Retry-After": "1"}, {"error": "no", "request_id": "abc123"}), OK])
    with pytest.raises(ServiceError) as caught:
        Client(server.url, retry=FAST).info()
    assert caught.value.status == status and len(server.seen) == 1
    assert caught.value.exit_code == (2 if status in (400, 413, 422) else 1)  # the CLI's usage vs runtime
    assert f"HTTP {status}: no" in str(caught.value)
    if status == 500:  # a bug: the request id is what to report
        assert caught.value.request_id == "abc123" and "request id abc123" in str(caught.value)


def test_attempts_are_bounded_and_backoff_grows_with_jitter(scripted: Callable[..., Scripted]) -> None:
    server = scripted([(503, {}, {"error": "down"})])
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=5, backoff_base_s=0.1, backoff_max_s=0.3, deadline_s=30)
    client = Client(server.url, retry=policy, sleep=waits.append, rng=random.Random(0))
    with pytest.raises(ServiceError, match="HTTP 503"):
        client.search("x")
    assert len(server.seen) == 5 and len(waits) == 4
    caps = [0.1, 0.2, 0.3, 0.3]  # base * 2**n, capped
    assert all(0 <= w <= cap for w, cap in zip(waits, caps, strict=True))
    assert len(set(waits)) == 4  # jittered, not a fixed schedule


def test_a_retry_after_past_the_deadline_is_not_waited_for(scripted: Callable[..., Scripted]) -> None:
    server = scripted([(503, {"Retry-After": "120"}, {"error": "down"}), OK])
    waits: list[float] = []
    with pytest.raises(ServiceError) as caught:
        Client(server.url, retry=RetryPolicy(deadline_s=5), sleep=waits.append).search("x")
    assert waits == [] and len(server.seen) == 1 and caught.value.retry_after_s == 120


def test_a_refused_connection_is_retried_then_reported() -> None:
    waits: list[float] = []
    client = Client(f"http://127.0.0.1:{free_port()}", retry=FAST, sleep=waits.append)
    with pytest.raises(DependencyUnavailable, match="cannot reach reir service"):
        client.search("x")
    assert len(waits) == FAST.max_attempts - 1


def test_batch_search_posts_the_queries(scripted: Callable[..., Scripted]) -> None:
    server = scripted([(200, {}, {"responses": [{"status": 200, "result": {"results": []}},
                                                {"status": 422, "error": "invalid request"}]})])
    out = Client(server.url).search_batch([{"query": "a"}, {"query": ""}])
    assert [r["status"] for r in out] == [200, 422] and server.seen[0][1] == "/v1/search/batch"


def test_discover_follows_the_pages_to_the_last(scripted: Callable[..., Scripted]) -> None:
    def page(ids: list[str], next_offset: int | None) -> tuple[int, dict[str, str], dict]:
        return (200, {}, {"results": [{"image_id": i} for i in ids], "total": 5, "next_offset": next_offset})

    server = scripted([page(["a", "b"], 2), page(["c", "d"], 4), page(["e"], None)])
    found = Client(server.url).discover("a red circle", page_size=2)
    assert [r["image_id"] for r in found] == ["a", "b", "c", "d", "e"]
    sent = [json.loads(b) for b in server.bodies]
    assert [b.get("offset", 0) for b in sent] == [0, 2, 4]
    assert all(b["mode"] == "discover" and b["top_k"] == 2 for b in sent)
    capped = scripted([page(["a", "b"], 2), page(["c", "d"], 4)])
    assert [r["image_id"] for r in Client(capped.url).discover("q", page_size=2, max_results=3)] == ["a", "b", "c"]
    assert len(capped.bodies) == 2  # no page is asked for past max_results


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 25 Nov 2026 04:00:10 GMT", now=1795579200.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
