"""Reading by URI over a real local HTTP server: bytes, manifests, limits, deadlines, errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from reir.ingestion.gallery import read_image_bytes, read_manifest
from reir.platform.uri import UriReadError, is_local, join_uri, read_uri, scheme_of
from reir.serving.localize import ImageReadError, open_image
from tests.http_files import STREAM_BYTES, FileServer, serve_files


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, FileServer]]:
    root = tmp_path / "site"
    (root / "photos").mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 0, 255)).save(root / "photos" / "a.png")
    (root / "photos" / "b.bin").write_bytes(bytes(range(256)) * 4)
    with serve_files(root) as server:
        yield root, server


def test_http_reads_the_served_bytes_and_the_local_forms_read_the_file(files: tuple[Path, FileServer]) -> None:
    root, server = files
    local = root / "photos" / "b.bin"
    assert read_uri(f"{server.url}/photos/b.bin") == local.read_bytes()
    assert server.requests == ["/photos/b.bin"]
    assert read_uri(str(local)) == read_uri(f"file://{local}") == local.read_bytes()
    with pytest.raises(FileNotFoundError):  # dead letters name it
        read_uri(str(root / "gone.jpg"))


def test_failures_are_uri_read_errors_that_say_why(files: tuple[Path, FileServer], tmp_path: Path) -> None:
    root, server = files
    with pytest.raises(UriReadError, match="HTTP 404"):
        read_uri(f"{server.url}/photos/missing.png")
    with pytest.raises(UriReadError, match="over the limit of 100"):  # declared Content-Length
        read_uri(f"{server.url}/photos/b.bin", max_bytes=100)
    with pytest.raises(UriReadError, match=f"more than the limit of {STREAM_BYTES // 2}"):  # no Content-Length
        read_uri(f"{server.url}/stream", max_bytes=STREAM_BYTES // 2)
    with pytest.raises(UriReadError, match="over the limit of 10"):
        read_uri(str(root / "photos" / "b.bin"), max_bytes=10)
    with pytest.raises(UriReadError, match="nosuch"):
        read_uri("nosuch://bucket/a.jpg")
    with pytest.raises(UriReadError, match="does not exist"):  # through a pyarrow filesystem (as s3/gs)
        read_uri("mock:///bucket/a.jpg")
    with pytest.raises(UriReadError):  # nothing listens there
        read_uri(f"{server.url.rsplit(':', 1)[0]}:9/a.jpg", timeout_s=2)


def test_a_slow_body_fails_at_the_total_deadline_not_per_read(files: tuple[Path, FileServer]) -> None:
    _, server = files
    start = time.monotonic()
    with pytest.raises(UriReadError, match="not read within 0.5 s"):
        read_uri(f"{server.url}/drip", timeout_s=0.5)  # a byte every 0.1 s: no single read times out
    assert time.monotonic() - start < 2.0


def test_an_http_manifest_resolves_relative_entries_against_its_own_url(files: tuple[Path, FileServer]) -> None:
    root, server = files
    rows = [{"uri": "photos/a.png", "image_id": "a"}, {"uri": f"{server.url}/photos/b.bin", "image_id": "b"}]
    (root / "gallery.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = read_manifest(f"{server.url}/gallery.jsonl", {})
    assert [(i.image_id, i.uri) for i in items] == [
        ("a", f"{server.url}/photos/a.png"),
        ("b", f"{server.url}/photos/b.bin"),
    ]
    batch = {"image_id": ["a", "gone"], "uri": [items[0].uri, f"{server.url}/photos/gone.png"]}
    out = read_image_bytes(batch)
    assert out["bytes"][0] == (root / "photos" / "a.png").read_bytes() and out["error"][0] == ""
    assert out["bytes"][1] == b"" and out["error"][1].startswith("UriReadError: ") and "404" in out["error"][1]


def test_the_localize_stage_opens_http_images_and_reports_unreadable_ones(files: tuple[Path, FileServer]) -> None:
    _, server = files
    with open_image(f"{server.url}/photos/a.png") as img:
        assert img.size == (40, 30)
    with pytest.raises(ImageReadError, match="404"):
        open_image(f"{server.url}/photos/missing.png")
    with pytest.raises(ImageReadError, match="over the pixel limit"):
        open_image(f"{server.url}/photos/a.png", max_pixels=100)


@pytest.mark.parametrize(
    ("base", "entry", "expected"),
    [
        ("http://h:1/dir/m.jsonl", "x/a.jpg", "http://h:1/dir/x/a.jpg"),
        ("http://h:1/dir/m.jsonl", "../a.jpg", "http://h:1/a.jpg"),
        ("s3://bucket/dir/m.csv", "a.jpg", "s3://bucket/dir/a.jpg"),
        ("s3://bucket/dir/m.csv", "https://cdn/a.jpg", "https://cdn/a.jpg"),
        ("/data/m.csv", "/abs/a.jpg", "/abs/a.jpg"),
    ],
)
def test_join_uri(base: str, entry: str, expected: str) -> None:
    assert join_uri(base, entry) == expected


def test_schemes() -> None:
    assert [scheme_of(u) for u in ("/a/b.jpg", "HTTP://h/a", "s3://b/k", "c:/x", "file:///a")] == [
        "", "http", "s3", "", "file"]  # fmt: skip
    assert is_local("/a.jpg") and is_local("file:///a.jpg") and not is_local("https://h/a.jpg")
