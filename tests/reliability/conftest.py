"""The dashboard's drill (``test_dashboard_drill.py``) drives the browser: its fixtures."""

from tests.support.browser import browser, dashboard, open_tab, shoot  # noqa: F401 - fixtures
