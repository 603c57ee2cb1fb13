"""One real Corral per test session: embedded Ray, Serve, the starter model."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from cluster.server import RunningCorral, start_corral
from cluster.settings import load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corral(tmp_path_factory) -> Iterator[RunningCorral]:
    """Corral started exactly as ``corral serve`` starts it, on a free loopback port."""
    settings = load_settings(
        host=f"127.0.0.1:{free_port()}",
        state_dir=tmp_path_factory.mktemp("state"),
        num_ctx=2048,
        num_threads=2,
        dashboard=False,
    )
    running = start_corral(settings)
    yield running
    running.stop()
