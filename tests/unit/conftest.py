"""Fixtures shared by the unit tests that serve the HTTP app in process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    """A client of the module's app at ``url`` (the module's own fixture)."""
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
