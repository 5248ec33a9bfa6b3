"""The web page in a real headless Chromium (Playwright driving Debian's `chromium`, no network).

The server runs with uvicorn on 127.0.0.1 in a thread; every request the page makes to anywhere else is
blocked and recorded, and the test fails if there was one (the page must work offline). Set
``CAPTION_PAGE_SCREENSHOT=/path.png`` to keep a screenshot of the captioned page.

Needs ``apt-get install -y chromium`` and the ``playwright`` Python package (the ``dev`` extra); skipped
with the reason otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.inference.engine import CaptionEngine
from pipeline.serve.app import create_app
from tests.helpers_bundle import MAX_LENGTH, image_bytes, serve_in_thread, tiny_bundle  # noqa: F401

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`"),
]


@pytest.fixture(scope="module")
def server(tiny_bundle):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = CaptionEngine.load(tiny_bundle)
    with serve_in_thread(create_app(engine)) as base:
        yield base, engine
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="`pip install playwright` (the dev extra)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900}, service_workers="block")
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    base, _ = server
    blocked: list[str] = []
    problems: list[str] = []

    def route(r):
        if r.request.url.startswith(base + "/") or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    browser.route("**/*", route)
    pg = browser.new_page()
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.goto(base + "/")
    pg.wait_for_selector("#mode option[value=creative_diverse]", state="attached")
    yield pg, problems
    pg.close()
    browser.unroute("**/*")
    assert not blocked, f"the page tried to load remote resources: {blocked}"


def test_upload_an_image_and_read_the_caption(page, server, tmp_path):
    pg, problems = page
    _, engine = server
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes("PNG", size=(96, 72), seed=5))
    assert "show_attend_tell" in pg.inner_text("#model")
    assert not pg.is_visible("#key-row")  # no key needed here

    pg.set_input_files("#file", str(image))  # choosing a file captions it
    pg.wait_for_selector("#result[data-state=done]")
    shown = pg.inner_text("#caption").strip()
    want = engine.result(engine.run([engine.prepare(engine.decode(image.read_bytes()))],
                                    engine.options("consistent")).captions[0], mode="consistent")
    assert shown == want["caption"] and len(shown.split()) == MAX_LENGTH
    alternatives = pg.locator("#alternatives li").all_inner_texts()
    assert [a.split("score")[0].strip() for a in alternatives] == [a["caption"] for a in want["alternatives"]]
    # one heatmap per word, plus the image as the model saw it
    assert pg.locator("#heatmaps figure.word").count() == MAX_LENGTH
    assert pg.locator("#heatmaps figure.input").count() == 1
    assert pg.locator("#heatmaps figure.word figcaption").all_inner_texts() == shown.split()
    assert pg.evaluate("() => [...document.querySelectorAll('#heatmaps img')].every(i => i.complete && i.naturalWidth > 0)")
    pg.hover("#caption span[data-index='2']")
    assert "on" in (pg.get_attribute("#heatmaps figure[data-index='2']", "class") or "")
    assert "batch of" in pg.inner_text("#timings")

    pg.select_option("#mode", "creative_diverse")  # changing the mode captions again
    pg.wait_for_selector("#score:has-text('creative diverse mode')")  # (the page's CSP forbids eval-based waits)
    pg.wait_for_selector("#result[data-state=done]")
    assert len(pg.inner_text("#caption").split()) == MAX_LENGTH
    screenshot = os.environ.get("CAPTION_PAGE_SCREENSHOT")
    if screenshot:
        pg.screenshot(path=screenshot, full_page=True)
    assert not problems, problems


def test_a_bad_file_shows_the_servers_error(page, tmp_path):
    pg, problems = page
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"definitely not an image")
    pg.set_input_files("#file", str(bad))
    pg.wait_for_selector("#error:not([hidden])")
    assert "not an image" in pg.inner_text("#error")
    assert pg.get_attribute("#result", "data-state") == "error"
    # the failed fetch (422) is logged by Chromium as a console error; nothing else may be
    assert all("422" in p for p in problems), problems


def test_the_api_key_field_when_the_server_needs_one(browser, server, tmp_path):
    _, engine = server
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes("PNG", seed=6))
    with serve_in_thread(create_app(engine, api_key="k3y", warm_up=False)) as base:
        pg = browser.new_page()
        try:
            pg.goto(base + "/")
            pg.wait_for_selector("#key-row:not([hidden])")
            pg.set_input_files("#file", str(image))
            pg.wait_for_selector("#error:not([hidden])")
            assert "API key" in pg.inner_text("#error")
            pg.fill("#api-key", "k3y")
            pg.click("#go")
            pg.wait_for_selector("#result[data-state=done]")
            assert len(pg.inner_text("#caption").split()) == MAX_LENGTH
        finally:
            pg.close()


def test_the_api_docs_work_under_their_content_security_policy(page, server):
    pg, problems = page
    base, _ = server
    r = pg.goto(base + "/docs")
    if r.status == 404:
        pytest.skip("swagger-ui-py not installed: no /docs")
    assert "script-src 'self' 'sha256-" in r.headers["content-security-policy"]
    pg.wait_for_selector(".opblock-summary-path[data-path='/caption']")  # Swagger UI ran and read /openapi.json
    pg.click(".opblock-summary-path[data-path='/caption']")
    pg.wait_for_selector("text=CaptionJSONRequest", state="attached")
    assert not problems, problems  # a CSP violation is a console error
