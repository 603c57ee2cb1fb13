"""GGUF files: recognising them before llama.cpp is asked to load one."""

from __future__ import annotations

from pathlib import Path

from nodes.errors import ModelLoadFailed

GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | Path) -> None:
    """Refuse a missing, empty or non-GGUF file with a message that says which."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadFailed(f"The model file {p} does not exist.")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadFailed(
            f"The model file {p} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
            f"Re-download or re-create the model."
        )
