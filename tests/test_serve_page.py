"""The service's web page in headless Chromium (Debian's), driven by Playwright over the real server.

Playwright's Python package drives the system Chromium through ``executable_path``: no browser
is downloaded. A prompt typed into the page goes through the same API apps call.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving import REFINE_ALL, ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (Debian package 'chromium'); the page is not rendered"
)


def test_a_prompt_submitted_through_the_page_shows_both_images_and_scores(tmp_path):
    from playwright.sync_api import sync_playwright

    with ServerProcess(tmp_path, policy={**REFINE_ALL, "guard": False}) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            assert page.title() == "grefine-hooks"
            page.fill("#prompt", "a red book on a wooden table")
            page.fill("#seed", "4")
            page.fill("#size", "64x64")
            page.click("#submit")
            page.wait_for_selector("section.result", timeout=180_000)

            result = page.locator("section.result").first
            for test_id in ("generated", "returned", "map-P", "map-A"):
                image = result.locator(f'img[data-testid="{test_id}"]')
                assert image.evaluate("img => img.complete && img.naturalWidth") == 64, test_id
            generated = result.locator('img[data-testid="generated"]').get_attribute("src")
            returned = result.locator('img[data-testid="returned"]').get_attribute("src")
            assert generated != returned  # refined: the two differ
            text = result.inner_text()
            assert "refined" in text and "p before / after" in text
            assert page.locator("#status").inner_text().startswith("done: 1 image")

            page.fill("#size", "abc")
            page.click("#submit")
            page.wait_for_selector("#status.error", timeout=60_000)
            assert "400" in page.locator("#status").inner_text() and "(size)" in page.locator("#status").inner_text()
            assert errors == []
        finally:
            browser.close()
