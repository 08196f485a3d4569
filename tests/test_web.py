"""The live canvas page in headless Chromium (Debian's `chromium`, driven by Playwright; never `playwright install`):
load `/`, submit a prompt, watch the canvas redraw on draft events, read the final answer; select part of it and
rewrite that span in place through `/v1/edits`; a phone-width layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from serving import CANVAS, LiveServer, server_checkpoint

from dgemma.generate import Pipeline
from dgemma.server import create_app

CHROMIUM = Path(os.environ.get("DGEMMA_CHROMIUM", "/usr/bin/chromium"))
# skipped on a developer machine without Chromium, but never in CI: there a missing browser fails the run
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason=f"{CHROMIUM} missing (apt-get install -y chromium)"
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
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


def run_page(browser, url: str, key: str | None = None, **page_options):
    page = browser.new_page(**page_options)
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
        assert not any("pinned" in c for c in classes)  # a completion pins nothing but its settled prefix
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


STATUS = "document.getElementById('status').textContent"


def edit(page, start: int, end: int) -> None:
    """Select answer characters [start, end) and click "Regenerate selection" (the same path as a mouse selection)."""
    assert page.evaluate(f"window.dgemma.selectRange({start}, {end})") == [start, end]
    page.click("#regenerate")
    page.wait_for_function(f"{STATUS} !== 'editing…'", timeout=60_000)


def test_page_rewrites_a_selection_in_place(browser, pipeline):
    with LiveServer(create_app(pipeline, model_id="tiny")) as s:
        page, errors = run_page(browser, s.url)
        answer = page.evaluate("window.dgemma.text")
        a, b = len(answer) // 3, 2 * len(answer) // 3
        assert page.is_disabled("#regenerate")
        edit(page, a, b)
        assert page.text_content("#status") == "edited" and not errors
        assert page.evaluate("window.dgemma.editFrames") >= 2 and page.evaluate("window.dgemma.edits") == 1
        last = page.evaluate("window.dgemma.lastEdit")
        sent = last["request"]
        assert (sent["text"], sent["start"], sent["end"], sent["context"]) == (answer, a, b, "The old city")
        assert (sent["seed"], sent["steps"], sent["stream_options"]["include_draft"]) == (7, 5, True)
        start, end, out = last["start"], last["end"], page.text_content("#output")
        assert end == b and start in (a, a - 1)  # the server may widen the span by the space before it
        assert out == page.evaluate("window.dgemma.text") == last["text"]
        assert out == answer[:start] + last["replacement"] + answer[end:]
        assert page.text_content("#output .edited") == last["replacement"]  # the new span is highlighted
        assert any("pinned" in c.get_attribute("class") for c in page.query_selector_all("#canvas .cell"))
        direct = {k: v for k, v in sent.items() if k not in ("stream", "stream_options")}
        reply = httpx.post(s.url + "/v1/edits", json=direct, timeout=60).json()
        assert (reply["text"], reply["start"], reply["end"]) == (out, start, end)  # seeded edits are deterministic
        page.close()


def test_page_edit_errors_and_stop_leave_the_page_usable(browser, pipeline):
    with LiveServer(create_app(pipeline, model_id="tiny")) as s:
        page, errors = run_page(browser, s.url)
        answer = page.evaluate("window.dgemma.text")
        assert page.evaluate("window.dgemma.selectRange(3, 3)") is None and page.is_disabled("#regenerate")
        page.evaluate("getSelection().selectAllChildren(document.querySelector('header h1'))")  # not the answer
        page.wait_for_function("document.getElementById('regenerate').disabled")

        def past_the_end(route):
            body = json.loads(route.request.post_data)
            route.continue_(post_data=json.dumps({**body, "end": len(body["text"]) + 5}))

        page.route("**/v1/edits", past_the_end)
        edit(page, 2, 6)
        assert "the text's length" in page.text_content("#status")
        assert page.get_attribute("#status", "class") == "error"
        assert page.text_content("#output") == answer and page.evaluate("window.dgemma.edits") == 0
        assert page.is_enabled("#generate") and page.is_disabled("#stop")

        held = []
        page.unroute("**/v1/edits")
        page.route("**/v1/edits", lambda route: held.append(route))  # never answered: the edit runs until Stop
        page.evaluate("window.dgemma.selectRange(2, 6)")
        page.click("#regenerate")
        page.wait_for_function("!document.getElementById('stop').disabled")
        page.click("#stop")
        page.wait_for_function(f"{STATUS} === 'stopped'")
        assert held and page.text_content("#output") == answer

        page.unroute("**/v1/edits")
        edit(page, 2, 6)
        assert page.text_content("#status") == "edited" and page.evaluate("window.dgemma.edits") == 1 and not errors
        page.close()


def test_page_fits_a_phone_width(browser, pipeline):
    with LiveServer(create_app(pipeline, model_id="tiny")) as s:
        page, errors = run_page(browser, s.url, viewport={"width": 420, "height": 800})
        assert page.text_content("#status") == "done" and not errors
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        for button in ("#generate", "#stop", "#regenerate"):
            box = page.locator(button).bounding_box()
            assert page.is_visible(button) and box["x"] >= 0 and box["x"] + box["width"] <= 420, button
        grow = """() => { const out = document.getElementById('output'), h = out.offsetHeight;
                    out.classList.add('running'); const g = out.offsetHeight - h; out.classList.remove('running');
                    return g; }"""
        assert page.evaluate(grow) == 0  # the end of a run does not reflow the answer (the cursor keeps its room)
        page.close()
