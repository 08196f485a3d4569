"""The live canvas page in headless Chromium (Debian's `chromium`, driven by Playwright; never `playwright install`):
load `/`, submit a prompt, watch the canvas redraw on draft events, read the final answer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serving import CANVAS, LiveServer, server_checkpoint

from dgemma.generate import Pipeline
from dgemma.server import create_app

CHROMIUM = Path(os.environ.get("DGEMMA_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
KEY = "page-key"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return Pipeline.load(server_checkpoint(tmp_path_factory.mktemp("web_ckpt")), device="cpu")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # a dev dependency; only a missing browser skips

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def run_page(browser, url: str, key: str | None = None):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("window.dgemma && window.dgemma.model !== null")
    if key is not None:
        assert page.is_visible("#apikey")
        page.fill("#apikey", key)
    page.fill("#prompt", "The old city")
    page.select_option("#mode", "completion")
    page.fill("#max_tokens", str(2 * CANVAS))
    page.fill("#steps", "5")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent !== 'generating…'", timeout=60_000)
    return page, errors


def test_page_streams_the_canvas_and_the_answer(browser, pipeline):
    with LiveServer(create_app(pipeline, model_id="tiny")) as s:
        page, errors = run_page(browser, s.url)
        assert page.text_content("#status") == "done" and not errors
        frames = page.evaluate("window.dgemma.frames.size")
        assert frames >= 2 and int(page.get_attribute("#canvas", "data-frames")) >= 2
        cells = page.query_selector_all("#canvas .cell")
        assert len(cells) == CANVAS
        classes = {c.get_attribute("class") for c in cells}
        assert any("accepted" in c for c in classes)  # accepted vs renoised cells are styled apart
        expected = pipeline.generate("The old city", seed=7, max_new_tokens=2 * CANVAS, steps=5)
        text = pipeline.tokenizer.decode(expected.token_ids)
        assert page.evaluate("window.dgemma.text") == text
        assert page.text_content("#output") == text
        assert page.text_content("#s-tpf") not in ("", "–")
        page.close()


def test_page_sends_the_api_key(browser, pipeline):
    with LiveServer(create_app(pipeline, model_id="tiny", api_key=KEY)) as s:
        page, errors = run_page(browser, s.url, key=KEY)
        assert page.text_content("#status") == "done" and not errors
        assert page.evaluate("window.dgemma.frames.size") >= 2
        page.close()
        page, _ = run_page(browser, s.url, key="wrong")
        assert "API key" in page.text_content("#status")
        page.close()
