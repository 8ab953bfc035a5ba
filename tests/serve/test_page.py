"""The chat page at `/` driven in headless Chromium (Debian's browser through Playwright; no browser download): a
sent message produces a streamed assistant reply, the Stop button ends a long reply early, and a screenshot is
saved (under $TINYLLM_ARTIFACTS when set). Skips with the reason when Playwright or Chromium is missing."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    for name in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(name):
            return name
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium browser installed (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    path = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_is_self_contained(make_server, checkpoint) -> None:
    server = make_server(checkpoint)
    html = httpx.get(server.url + "/").text
    assert "<title>tinyllm chat</title>" in html and "http" not in html.replace("http-equiv", "")  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        r = httpx.get(server.url + asset)
        assert r.status_code == 200 and "https://" not in r.text


def test_chat_page_streams_a_reply(make_server, checkpoint, browser, tmp_path) -> None:
    server = make_server(checkpoint)
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert "tiny" in page.inner_text("#model")
    page.fill("#max_tokens", "24")
    page.fill("#seed", "3")
    page.fill("#prompt", "你好！hello there")
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-finish]:not([data-finish=''])", timeout=30_000)
    assert page.inner_text(".message.user") == "你好！hello there"
    reply = page.locator(".message.assistant").first
    assert reply.get_attribute("data-finish") in ("length", "stop")
    assert "first token" in reply.inner_text()
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    # a long reply, stopped from the page: the request is aborted on the server
    page.fill("#max_tokens", "200")
    page.fill("#prompt", "tell me a long story")
    gate = threading.Event()
    server.state.loop._submit(lambda: gate.wait(10))  # hold the engine so the reply cannot finish on its own
    try:
        page.click("#send")
        page.click("#stop")
        page.wait_for_function("document.querySelectorAll('.message.assistant')[1].dataset.finish === 'stopped'",
                               timeout=10_000)
    finally:
        gate.set()
    deadline = time.time() + 10
    while server.state.loop.num_in_flight and time.time() < deadline:
        time.sleep(0.02)
    assert server.state.loop.num_in_flight == 0 and server.state.metrics.aborted >= 1
    out = Path(os.environ.get("TINYLLM_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    page.close()
