"""Small vector helpers for embedding tests."""

from __future__ import annotations

from collections.abc import Sequence


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    """Dot product; for unit vectors, their cosine similarity."""
    return sum(x * y for x, y in zip(a, b, strict=True))
