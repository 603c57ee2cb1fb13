"""The dashboard's drill: a box that leaves the cluster turns red on the page.

It lives with the failure drills, after the integration suite, because the box it
unplugs stays listed (down) for the rest of the session, as the drills' boxes do.
"""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from tests.conftest import simulated_node

pytestmark = pytest.mark.integration


def test_a_box_that_leaves_turns_red(corral, homelab, dashboard, shoot):
    box = homelab.cluster.add_node(**simulated_node("nas-ram8g", "worker", "ui-box"))
    removed = None
    try:
        tab = dashboard("cluster")
        card = tab.page.locator('.node-card[data-node="ui-box"]')
        expect(card).to_have_attribute("data-state", "up", timeout=60_000)
        homelab.cluster.remove_node(box, allow_graceful=False)
        removed = time.monotonic()
        expect(card).to_have_attribute("data-state", "down", timeout=60_000)
        print(f"\nthe card turned red {time.monotonic() - removed:.1f} s after the box left")
        expect(card).to_have_class(re.compile(r"\bdown\b"))
        expect(card).to_contain_text("down since")
        shoot(tab, "dashboard-box-down")
    finally:
        if removed is None:
            homelab.cluster.remove_node(box, allow_graceful=False)
