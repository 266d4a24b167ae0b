"""The image route proxies gallery images whose stored uri is http(s), and only images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reir.serving.http import HttpSettings, create_http_app
from tests.http_files import FileServer, serve_files
from tests.serving.test_http import StubBackend


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, FileServer]]:
    root = tmp_path / "site"
    root.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "a.png")
    (root / "page.png").write_text("<html><script>alert(1)</script></html>")  # named like an image
    with serve_files(root) as server:
        yield root, server


def test_an_http_image_in_the_index_is_proxied_with_its_own_media_type(site: tuple[Path, FileServer]) -> None:
    root, server = site
    uris = {"a": f"{server.url}/a.png", "html": f"{server.url}/page.png", "gone": f"{server.url}/gone.png",
            "down": "http://127.0.0.1:9/a.png"}  # fmt: skip
    # image_roots limit local files; a remote uri is served because the index holds it.
    client = TestClient(create_http_app(StubBackend(uris=uris), settings=HttpSettings(image_roots=(root,))))
    resp = client.get("/v1/images/a")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.content == (root / "a.png").read_bytes()
    assert client.get("/v1/images/html").status_code == 404  # not an image: never served as one
    for image_id in ("gone", "down"):  # the source answers 404 / nothing listens
        resp = client.get(f"/v1/images/{image_id}")
        assert resp.status_code == 502 and "could not be read" in resp.json()["error"], image_id
    assert client.get("/v1/images/not-in-the-index").status_code == 404
    assert server.requests == ["/a.png", "/page.png", "/gone.png"]
