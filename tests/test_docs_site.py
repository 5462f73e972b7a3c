"""The built documentation site renders in a real headless browser.

Opens the home page and the API page of ``docs/_build/html`` (built by
``make docs``) in Debian's chromium through chromedriver, served from a local
HTTP server on 127.0.0.1, and checks what a reader sees: the title, the
navigation, a code block, the search box and search results, and no errors in
the browser console. ``make test`` sets ``BN_JAX_REQUIRE_BROWSER=1``, so there
a missing browser or site fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import pathlib
import shutil
import tempfile
import threading

import pytest

HTML = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_build" / "html"
REQUIRED = os.environ.get("BN_JAX_REQUIRE_BROWSER") == "1"
# Without the background-networking flags chromium keeps trying to reach
# hosts that this network does not have, and logs each refusal.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def site_url():
    if not (HTML / "index.html").exists():
        _unavailable(f"no built site at {HTML}: run `make docs` first")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the server logs nothing
        pass


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed: pip install -e '.[docs]'")
    chromium = _find(("chromium", "chromium-browser"))
    driver_path = _find(("chromedriver",))
    if chromium is None or driver_path is None:
        _unavailable(
            "no headless browser found (chromium and chromedriver on PATH): "
            "apt-get install -y chromium chromium-driver"
        )
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        driver.set_page_load_timeout(30)
        try:
            yield driver
        finally:
            with contextlib.suppress(Exception):
                driver.quit()


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _visible_texts(driver, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def test_home_page_renders(browser, site_url):
    from selenium.webdriver.common.by import By

    browser.get(site_url + "/index.html")
    assert "bn_jax" in browser.title
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("bn_jax")
    nav = _visible_texts(browser, ".sidebar-tree a")
    for page in ("Getting started", "Flax drop-ins", "Distributed use", "API reference"):
        assert page in nav, nav
    assert any("pip install" in c for c in _visible_texts(browser, "div.highlight pre"))
    search = browser.find_element(By.CSS_SELECTOR, "input[name='q']")
    assert search.is_displayed()
    assert _console_errors(browser) == []

    # a page's executed code cell shows its source and its output
    browser.find_element(By.LINK_TEXT, "Getting started").click()
    assert browser.title.startswith("Getting started")
    code = _visible_texts(browser, ".cell_input pre")
    assert any("bn_jax.BatchNorm(momentum=0.9)" in c for c in code), code
    outputs = _visible_texts(browser, ".cell_output pre")
    assert any("running mean after one step" in o for o in outputs), outputs
    assert _console_errors(browser) == []


def test_api_page_renders_and_search_finds_it(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site_url + "/api.html")
    assert browser.title.startswith("API reference")
    signatures = _visible_texts(browser, "dl.py.class > dt")
    assert any(s.startswith("class bn_jax.BatchNorm(") for s in signatures), signatures
    examples = _visible_texts(browser, "dl.py.class div.highlight pre")
    assert any("bn_jax.BatchNorm(" in e for e in examples), examples  # a docstring's example
    assert "API reference" in _visible_texts(browser, ".sidebar-tree a")
    assert _console_errors(browser) == []

    box = browser.find_element(By.CSS_SELECTOR, "input[name='q']")
    box.send_keys("recalibrate", Keys.ENTER)
    WebDriverWait(browser, 20).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#search-results li"))
    )
    results = _visible_texts(browser, "#search-results li")
    assert any("recalibrate" in r for r in results), results
    assert _console_errors(browser) == []
