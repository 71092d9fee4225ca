"""The playground at GET /: served without a key, self-contained (nothing from other hosts), shipped in the wheel,
and driven in a real browser (Debian's headless Chromium through Playwright): models listed, a chat message and
a raw completion streamed, and Stop aborting a generation mid-stream so the server frees its KV blocks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine
from live_server import serve, wait_for

from llmengine_runtime.server.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 120_000  # a 2-core machine shared with other work: generous, never a figure the test asserts


def test_page_needs_no_key_and_fetches_nothing_from_other_hosts():
    with serve(create_app({"fake": FakeEngine()}, api_key="k")) as live:
        r = httpx.get(live.url + "/")
        api = httpx.get(live.url + "/v1/models")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<title>llmengine playground</title>" in html
    for route in ("/v1/models", "/v1/chat/completions", "/v1/completions", "AbortController", "Authorization"):
        assert route in html
    assert api.status_code == 401  # only the page is open, not the API
    urls = re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'<>]*", html)
    assert all(u.startswith(live.url) for u in urls), urls
    assert not re.search(r"<(script|img|iframe|link)\b[^>]*\b(src|href)\s*=", html, re.I)
    assert not re.search(r"@import|url\(", html)
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


@pytest.mark.slow
def test_the_wheel_ships_the_page(tmp_path):
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "out")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name if src.exists() else (src.mkdir() or src / name))
    for package in ("llmengine_runtime", "sdk/llmengine"):
        shutil.copytree(REPO / package, src / package, ignore=skip)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--disable-pip-version-check", "-q", str(src), "-w", str(tmp_path / "dist")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("llmengine_runtime-*.whl")
    page = "llmengine_runtime/server/static/playground.html"
    with zipfile.ZipFile(wheel) as z:
        assert z.read(page) == (REPO / page).read_bytes()


# ---- in a real browser -------------------------------------------------------------------------------------------
def browser_unavailable() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in the [dev] extra: pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return (f"no browser: {CHROMIUM} is missing and `make setup` could not install Debian's chromium with "
                "apt-get here (see .venv/chromium-install.log); browser downloads are not possible")
    return None


@pytest.fixture(scope="module")
def browser():
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """open_page(url) -> a fresh page at url; fails the test on any uncaught error in the page's script."""
    contexts, errors = [], []

    def opener(url: str):
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert not errors, errors


def finished(page) -> None:
    page.wait_for_function("() => document.getElementById('stop').disabled && "
                           "document.getElementById('status').textContent !== 'generating…'")


def models_listed(page) -> list[str]:
    page.wait_for_function("() => !document.getElementById('model').disabled")
    return page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")


@pytest.mark.slow
def test_browser_key_raw_completion_and_stop_on_the_fake_engine(open_page):
    engine = FakeEngine(delay=0.05, max_model_len=200)
    with serve(create_app({"fake": engine}, api_key="secret")) as live:
        page = open_page(live.url + "/")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
        assert page.locator("#status.error").count() == 1
        page.fill("#api-key", "secret")
        page.click("#reload")
        assert models_listed(page) == ["fake"]

        page.click("#tab-raw")
        page.fill("#raw-prompt", "a b c")
        page.fill("#max-tokens", "5")
        page.click("#raw-send")
        finished(page)
        assert page.text_content("#raw-completion") == " w0 w1 w2 w3 w4"
        assert page.text_content("#status") == "done"
        stats = page.text_content("#stats")
        assert re.match(r"5 tokens · [\d.]+ tok/s · first token \d+ ms · finish: length$", stats), stats

        page.fill("#max-tokens", "150")
        page.click("#raw-send")
        page.wait_for_function("() => document.getElementById('raw-completion').textContent.length > 0")
        assert len(live.state.jobs) == 1 and engine.stats()["blocks_used"] > 0
        page.click("#stop")
        finished(page)
        assert wait_for(lambda: engine.stats()["blocks_used"] == 0 and not live.state.jobs, timeout=5)
        assert len(engine.aborts) == 1  # the server saw the disconnect and aborted the request
        assert page.text_content("#status").startswith("stopped")
        assert "stopped" in page.text_content("#stats")
        assert len(page.text_content("#raw-completion").split()) < 150


def test_browser_chat_and_stop_on_the_default_model(open_page, llm_server):
    page = open_page(llm_server.url + "/")
    assert models_listed(page) == [llm_server.engine.name]
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelector('.msg.assistant').textContent.trim().length > 0")
    finished(page)
    assert page.text_content("#status") == "done", page.text_content("#status")
    assert page.text_content(".msg.user") == "What is the capital of France?"
    reply = page.text_content(".msg.assistant")
    assert "Paris" in reply, reply
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token \d+ ms · finish: (stop|length)$",
                     page.text_content("#stats")), page.text_content("#stats")

    # a long generation (the end token ignored), stopped mid-stream: the server frees its blocks
    engine, state = llm_server.engine, llm_server.state
    page.click("#tab-raw")
    page.fill("#raw-prompt", "Once upon a time")
    page.fill("#max-tokens", "2000")
    page.check("#ignore-eos")
    page.click("#raw-send")
    page.wait_for_function("() => document.getElementById('raw-completion').textContent.length > 0")
    assert len(state.jobs) == 1 and engine.stats()["blocks_used"] > 0
    page.click("#stop")
    finished(page)
    assert wait_for(lambda: engine.stats()["blocks_used"] == 0 and not state.jobs, timeout=10), engine.stats()
    assert page.text_content("#status").startswith("stopped")
    assert len(page.text_content("#raw-completion")) > 0
