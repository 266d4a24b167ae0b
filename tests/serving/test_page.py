"""The search page in a real headless Chromium (Debian's package, driven by Playwright):
type a query, see result cards with the image and the box drawn over it; and a folder of
real photos (coco-mini) indexed as it is, served, and one photo found by its id."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from reir.ingestion.pipeline import IngestSummary
from reir.platform.config import IngestConfig, MilvusConfig
from reir.serving.lifecycle import wait_until_routed
from tests.platform.fakes import quadrant_image
from tests.serving.conftest import SEARCH_KEY, FakeApp

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary (CI installs Debian's `chromium` package in .ci/run)")


def test_type_a_query_and_see_boxes(fake_app: FakeApp, tmp_path: Path) -> None:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(f"{fake_app.url}/", timeout=60_000)
            page.fill("#key", SEARCH_KEY)
            page.fill("#k", "3")
            page.fill("#q", "yellow")
            page.press("#q", "Enter")
            page.wait_for_selector(".card[data-loaded='1']", timeout=60_000)
            cards = page.locator(".card")
            assert cards.count() == 3
            # Each card loads its image on its own: wait for all of them, not the first to finish.
            page.wait_for_function("() => [...document.querySelectorAll('.card')]"
                                   ".every(c => c.dataset.loaded === '1')", timeout=60_000)
            first = cards.nth(0)
            assert "img_yellow" in first.inner_text()
            rect = first.locator("svg rect")
            assert [rect.get_attribute(a) for a in ("x", "y", "width", "height")] == ["0", "0", "32", "24"]
            assert first.locator("svg").get_attribute("viewBox") == "0 0 64 48"  # the image's own pixels
            # the box is drawn over the top-left quarter of the displayed image (the 3 px stroke straddles it)
            img, box = first.locator("img").bounding_box(), rect.bounding_box()
            assert img and box and abs(box["width"] - img["width"] / 2) <= 4 and abs(box["x"] - img["x"]) <= 3
            page.screenshot(path=str(tmp_path / "rank.png"))

            page.check("#discover")
            page.press("#q", "Enter")
            page.wait_for_function("document.querySelector('#status').textContent.includes('hold it')",
                                   timeout=60_000)
            # Discover mode's answer comes in pages of "top": the rest on demand, every match in the end.
            assert "4 image(s) hold it" in page.inner_text("#status") and "3 shown" in page.inner_text("#status")
            assert page.locator(".card svg rect").count() == 3 and page.is_visible("#more")
            page.click("#more")
            page.wait_for_function("document.querySelectorAll('.card').length === 4", timeout=60_000)
            assert "4 shown" in page.inner_text("#status") and not page.is_visible("#more")
            assert page.locator(".card .score").nth(3).inner_text().startswith("#4")
            ids = [page.locator(".card").nth(i).get_attribute("data-image-id") for i in range(4)]
            assert len(set(ids)) == 4  # the second page goes on where the first stopped

            page.fill("#key", "wrong-key")
            page.press("#q", "Enter")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('error')",
                                   timeout=60_000)
            assert "401" in page.inner_text("#status") and page.locator(".card").count() == 0
        finally:
            browser.close()


# --- your own photos: a plain folder indexed, served and searched ---------------------------------

COCO_MINI = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco-mini" / "val2017"
GRAY_PHOTO = "000000431848"  # the one grayscale photo of coco-mini (378 x 640)


def _ingest(gallery: Path, ckpt: Path, db: Path, **extra: object) -> IngestSummary:
    from reir.ingestion.pipeline import run_ingestion
    from tests.platform.fakes import fake_loader

    cfg = IngestConfig.model_validate({
        "gallery_root": gallery, "split": None, "model_path": str(ckpt), "milvus": MilvusConfig(uri=str(db)),
        "alias": "reir_live", "batch_size": 32, "num_cpus_per_encoder": 0.5, "top_k_instances": 4, **extra,
    })  # fmt: skip
    return run_ingestion(cfg, loader=fake_loader)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Resolved before the app fixtures that need a browser (skips cheaply when there is none)."""
    return _chromium()


@pytest.fixture(scope="module")
def photos_app(
    chromium: str, serve_url: str, fake_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """coco-mini's photos indexed as a plain folder into a default-named store, then served
    from that store and alias with no other step (what `reir index add` + `reir serve` do)."""
    from ray import serve

    from reir.serving.app import app_for, serve_config_from_args
    from tests.platform.fakes import fake_loader

    if not COCO_MINI.is_dir():
        pytest.skip(f"coco-mini photos not found at {COCO_MINI}")
    db = tmp_path_factory.mktemp("photos") / "reir.db"
    summary = _ingest(COCO_MINI, fake_checkpoint, db)
    assert (summary.images, summary.failures, summary.promoted) == (159, 0, True)
    cfg = serve_config_from_args({
        "model_path": str(fake_checkpoint), "milvus_uri": str(db), "candidates": "20",
        "num_cpus_encoder": "0.1", "num_cpus_searcher": "0.1", "num_cpus_ingress": "0.1",
    })  # fmt: skip
    serve.run(app_for(cfg, loader=fake_loader), name="photos", route_prefix="/photos")
    wait_until_routed(f"{serve_url}/photos")
    yield f"{serve_url}/photos"
    serve.delete("photos")


def test_a_folder_of_real_photos_is_searchable_in_the_browser(chromium: str, photos_app: str, tmp_path: Path) -> None:
    import requests

    everything = requests.post(f"{photos_app}/v1/search", json={"query": "white", "top_k": 5}, timeout=60)
    one = requests.post(f"{photos_app}/v1/search", json={"query": "white", "top_k": 5, "filters": [
        {"field": "image_id", "op": "prefix", "value": GRAY_PHOTO}]}, timeout=60)  # fmt: skip
    assert everything.status_code == one.status_code == 200, (everything.text, one.text)
    assert len(everything.json()["results"]) == 5, everything.text
    assert {r["image_id"] for r in one.json()["results"]} == {GRAY_PHOTO}, one.text
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(f"{photos_app}/", timeout=60_000)
            page.fill("#q", "white")
            page.fill("#image", GRAY_PHOTO)  # find one photo by its id
            page.press("#q", "Enter")
            page.wait_for_function("!document.querySelector('#status').textContent.startsWith('searching')",
                                   timeout=60_000)
            status = page.inner_text("#status")
            assert "result(s)" in status and not status.startswith("0 "), status
            page.wait_for_selector(".card[data-loaded='1']", timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('.card')]"
                                   ".every(c => c.dataset.loaded === '1')", timeout=60_000)
            cards = page.locator(".card")
            assert cards.count() >= 1
            assert {cards.nth(i).get_attribute("data-image-id") for i in range(cards.count())} == {GRAY_PHOTO}
            first = cards.nth(0)
            # the photo's own pixels; the fake model's boxes are its quadrants: 189 x 320 each
            assert first.locator("svg").get_attribute("viewBox") == "0 0 378 640"
            rect = first.locator("svg rect")
            x, y, w, h = (float(rect.get_attribute(a) or "nan") for a in ("x", "y", "width", "height"))
            assert (x in (0.0, 189.0), y in (0.0, 320.0), w, h) == (True, True, 189.0, 320.0)
            img, box = first.locator("img").bounding_box(), rect.bounding_box()
            assert img and box and abs(box["width"] - img["width"] / 2) <= 4 and abs(box["height"] - img["height"] / 2) <= 4
            page.screenshot(path=str(tmp_path / "photos.png"))
        finally:
            browser.close()


def _save(img: Image.Image, path: Path, fmt: str, **kw: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def _odd_folder(root: Path) -> dict[str, str]:
    """Generated photos under awkward names: relative path -> the colour of its upright top-left."""
    upright = {c: quadrant_image((c, "black", "black", "black")) for c in ("red", "green", "blue", "yellow", "white")}
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show": stored sideways, like a phone's portrait photo
    _save(upright["red"], root / "2024/a trip/IMG 0001.jpg", "JPEG", quality=95)
    _save(upright["green"], root / "2024/a trip/IMG [2].png", "PNG")
    _save(upright["blue"], root / "ünï cödé/日本 photo.webp", "WEBP", lossless=True)
    _save(upright["yellow"].convert("CMYK"), root / "other/it's cmyk.jpg", "JPEG", quality=95)
    _save(upright["white"].transpose(Image.Transpose.ROTATE_90), root / "other/rotated.jpg", "JPEG", quality=95,
          exif=exif)
    (root / "other/broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    _save(upright["red"], root / ".thumbnails/skip.jpg", "JPEG")
    (root / "other/notes.txt").write_text("not an image")
    return {"2024/a trip/IMG 0001.jpg": "red", "2024/a trip/IMG [2].png": "green",
            "ünï cödé/日本 photo.webp": "blue", "other/it's cmyk.jpg": "yellow", "other/rotated.jpg": "white"}


def test_a_folder_with_awkward_names_and_formats_is_indexed_filterable_and_served(
    ray_session: None, fake_checkpoint: Path, tmp_path: Path
) -> None:
    from starlette.testclient import TestClient

    from reir.ingestion.folder import scan_folder, summary_lines
    from reir.platform.filters import allowed_fields, compile_filters
    from reir.platform.store import MilvusStore
    from reir.serving.http import create_http_app
    from tests.platform.fakes import FakeModel
    from tests.serving.test_http import StubBackend

    root = tmp_path / "my photos"
    colours = _odd_folder(root)
    summary = _ingest(root, fake_checkpoint, tmp_path / "reir.db")
    assert (summary.images, summary.failures) == (5, 1)
    assert summary.dead_letter[0].uri.endswith("other/broken.jpg")
    lines = summary_lines(summary, scan_folder(root))
    assert lines[0].startswith("indexed 5 images (20 instances)") and "failed 1; ignored 2 non-image files" in lines[0]
    assert "other/broken.jpg: ImageDecodeError: not a readable image" in lines[1] and "serving" in lines[-1]

    ids: dict[str, str] = {}
    with MilvusStore(str(tmp_path / "reir.db"), "reir_live") as store:
        store.load()
        for name, colour in colours.items():
            uri = str((root / name).resolve())
            # a filter on the real file name (spaces, brackets, quote, unicode) finds exactly that photo
            flt = compile_filters([{"field": "uri", "op": "eq", "value": uri}], allowed_fields())
            hits = store.search(FakeModel._text_embedding(colour), 10, flt)[0]
            assert {h.uri for h in hits} == {uri} and len(hits) == 4, name
            # its colour is found top-left in the upright picture (EXIF applied, CMYK/WebP decoded)
            assert hits[0].box == (0.0, 0.0, 32.0, 24.0), name
            ids[name] = hits[0].image_id
    assert ids["2024/a trip/IMG 0001.jpg"].startswith("2024/a_trip/IMG_0001~")
    assert ids["other/rotated.jpg"] == "other/rotated"
    for image_id in ids.values():
        assert re.fullmatch(r"[A-Za-z0-9_.\-/]+(~[0-9a-f]{10})?", image_id), image_id

    # the image route takes those ids, with "/" as it is or fully URL-encoded
    uris = {image_id: str((root / name).resolve()) for name, image_id in ids.items()}
    client = TestClient(create_http_app(StubBackend(uris=uris)))
    for image_id, uri in uris.items():
        for path in (quote(image_id, safe="/"), quote(image_id, safe="")):
            resp = client.get(f"/v1/images/{path}")
            assert resp.status_code == 200 and resp.content == Path(uri).read_bytes(), (image_id, path)
    assert client.get("/v1/images/2024/a_trip/nope").status_code == 404
