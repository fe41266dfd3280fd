"""The web page in a real headless browser (Debian's chromium, driven by Playwright) against the real server."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, missing

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "test-artifacts" / "browser.png"


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        missing(f"{CHROMIUM} not found (apt-get install chromium)")
    return CHROMIUM


@contextlib.contextmanager
def served(checkpoint):
    """The real server for ``checkpoint`` in a thread of this process: yields its URL."""
    import uvicorn

    from showtell.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(checkpoint), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint):
    with served(tiny_checkpoint) as url:
        yield url


def test_page_captions_a_photo_and_shows_the_error_beside_a_broken_file(chromium, server_url, photos, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<!doctype html><html><body>not a photo</body></html>")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server_url + "/")
            expect(page.locator("#model")).to_contain_text("efficientnet_lite0")
            page.set_input_files("#picker", [str(photos / "chelsea.jpg"), str(broken)])

            good = page.locator(".card.ok")
            expect(good).to_have_count(1, timeout=30_000)
            expect(good.locator(".name")).to_have_text("chelsea.jpg")
            assert good.locator(".caption").inner_text().strip()
            expect(good.locator(".alternatives li")).to_have_count(2)
            expect(good.locator(".tags li")).to_have_count(5)  # chips: ImageNet label and percentage
            expect(good.locator(".tags li").first).to_have_text(re.compile(r"^Egyptian cat \d+%$"))
            assert good.locator("img").evaluate("img => img.naturalWidth") > 0

            bad = page.locator(".card.error")
            expect(bad).to_have_count(1, timeout=30_000)
            expect(bad.locator(".name")).to_have_text("broken.jpg")
            expect(bad.locator(".error")).to_contain_text("broken.jpg: not an image")
            expect(bad.locator(".tags li")).to_have_count(0)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
