"""The dashboard's browser tests: the fixtures are in ``tests/support/browser.py`` (the
reliability suite's dashboard drill uses them too)."""

from tests.support.browser import browser, dashboard, open_tab, shoot  # noqa: F401 - fixtures
