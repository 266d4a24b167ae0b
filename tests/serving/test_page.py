"""The search page in a real headless Chromium (Debian's package, driven by Playwright):
type a query, see result cards with the image and the box drawn over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
            assert "4 image(s) hold it" in page.inner_text("#status")
            assert page.locator(".card svg rect").count() == 4

            page.fill("#key", "wrong-key")
            page.press("#q", "Enter")
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('error')",
                                   timeout=60_000)
            assert "401" in page.inner_text("#status") and page.locator(".card").count() == 0
        finally:
            browser.close()
