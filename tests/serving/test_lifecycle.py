"""Waiting for a deployed app's route: Serve's HTTP proxy answers 404 for a moment after
``serve.run`` returns; reir starts traffic (and says "serving on") only once the app answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from reir.errors import ReirError
from reir.serving.lifecycle import local_base_url, wait_until_routed


class _Proxy(BaseHTTPRequestHandler):
    """Answers 404 to the first ``missing`` requests (a route not yet picked up), then 200 on /app/livez."""

    missing = 0
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        routed = len(type(self).paths) > type(self).missing
        code = 200 if routed and self.path == "/app/livez" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def proxy() -> Iterator[tuple[str, type[_Proxy]]]:
    handler = type("Handler", (_Proxy,), {"missing": 3, "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def test_waits_through_the_proxys_404s_until_the_app_answers(proxy: tuple[str, type[_Proxy]]) -> None:
    base, handler = proxy
    waited = wait_until_routed(f"{base}/app", interval_s=0.01)
    assert handler.paths == ["/app/livez"] * 4 and waited >= 0.0


def test_an_app_that_never_answers_is_one_clear_error(proxy: tuple[str, type[_Proxy]]) -> None:
    base, _ = proxy
    with pytest.raises(ReirError, match=r"/other/livez did not answer in 0 s \(HTTP 404\)"):
        wait_until_routed(f"{base}/other", timeout_s=0.2, interval_s=0.01)


def test_local_base_url_reaches_any_address_hosts_on_the_loopback() -> None:
    assert local_base_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert local_base_url("::", 8000, "/reir/") == "http://[::1]:8000/reir"
    assert local_base_url("10.0.0.5", 80, "/") == "http://10.0.0.5:80"
