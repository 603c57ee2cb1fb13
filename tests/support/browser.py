"""Fixtures for the dashboard in a real browser: Playwright driving Debian's ``chromium``.

``playwright install`` cannot download a browser here, so the tests launch the
one apt installs (``apt-get install chromium``; ``make test`` does it as root).
Without it the tests skip, except under ``CI``, where they fail.

``open_tab`` opens fresh tabs (1280x900 unless told) that record every console error
and uncaught exception; a test fails if one of its tabs had any (Chromium's own line
for a 4xx answer excepted: the tests provoke those). ``shoot`` saves a
screenshot in the test's temporary folder; with ``CORRAL_SCREENSHOTS=DIR`` the ones
the README shows (``README_SHOTS``) are copied to ``DIR`` too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
SCREENSHOTS_ENV = "CORRAL_SCREENSHOTS"
README_SHOTS = {"dashboard-cluster", "dashboard-activity", "dashboard-phone"}
CLIENT_ERROR = "Failed to load resource: the server responded with a status of 4"


def chromium_path() -> str | None:
    found = [p for p in CHROMIUM if Path(p).is_file()] or [shutil.which("chromium") or ""]
    return found[0] or None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Chromium, for one test module at a time.

    Playwright's sync API keeps its asyncio loop set as the main thread's running
    loop for as long as it is open, so ``asyncio.run`` fails in every test that runs
    while a browser is up: it must close when the module that needs it ends.
    """
    path = chromium_path()
    if path is None:
        message = "chromium is missing: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()


class Tab:
    """A page and what its console said."""

    def __init__(self, page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, message) -> None:
        # Chromium itself logs every 4xx answer as an error; the tests ask for some (a
        # wrong key, a broken models file) and the page shows them. Its own errors count.
        if message.type == "error" and not message.text.startswith(CLIENT_ERROR):
            self.errors.append(f"console.error: {message.text}")


@pytest.fixture
def open_tab(browser) -> Iterator[Callable[..., Tab]]:
    """Opens tabs (``open_tab(viewport=...)``); each must end with a clean console."""
    tabs: list[tuple[object, Tab]] = []

    def opener(viewport: dict | None = None) -> Tab:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
        tab = Tab(context.new_page())
        tab.page.set_default_timeout(30_000)
        tabs.append((context, tab))
        return tab

    yield opener
    errors = [e for _, tab in tabs for e in tab.errors]
    for context, _ in tabs:
        context.close()
    assert errors == [], "the page's JavaScript reported errors"


@pytest.fixture
def shoot(tmp_path) -> Callable[[Tab, str], Path]:
    def save(tab: Tab, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        tab.page.screenshot(path=path, full_page=True)
        if (target := os.environ.get(SCREENSHOTS_ENV)) and name in README_SHOTS:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    return save


@pytest.fixture
def dashboard(corral, open_tab) -> Callable:
    """Opens ``/ui#TAB`` in a new tab (with ``key`` in its session storage) and waits
    for its live stream (unless not ``live``: the page will ask for a key)."""

    def go(
        tab: str = "cluster",
        viewport: dict | None = None,
        key: str | None = None,
        live: bool = True,
    ):
        opened = open_tab(viewport)
        if key is not None:
            opened.page.add_init_script(f"sessionStorage.setItem('corral.key', {key!r})")
        opened.page.goto(f"{corral.url}/ui#{tab}")
        if live:
            expect(opened.page.locator("#conn")).to_have_attribute("data-state", "live")
        return opened

    return go
