"""Durations the way Ollama writes them: ``keep_alive: 5m``, ``"1h30m"``, ``300``, ``-1``.

A number is seconds; a string is a Go duration (``300ms``, ``1.5h``, ``2h45m``)
or a plain number; any negative duration means forever.
"""

from __future__ import annotations

import math
import re

FOREVER = math.inf
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value`` (``FOREVER`` if negative); ``ValueError`` says what is allowed."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(_ALLOWED)  # YAML's yes/no, an empty value, a list...
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        seconds = _parse_text(value.strip())
    if math.isnan(seconds):
        raise ValueError(_ALLOWED)
    return FOREVER if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """``5m``, ``1h30m``, ``45s``, ``forever``: how ``corral`` shows a duration."""
    if seconds == FOREVER or seconds < 0:  # negative means forever, as in parse_duration
        return "forever"
    total = round(seconds)
    if total == 0 and seconds > 0:
        return f"{seconds * 1000:.0f}ms"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "".join(parts) or "0s"


_ALLOWED = (
    "a duration like 30s, 5m, 1h30m, a number of seconds, 0 (unload at once) "
    "or a negative value (keep forever)"
)


def _parse_text(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:
        return sign * float(body)
    except ValueError:
        pass
    pos, seconds = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise ValueError(f"{text!r} is not {_ALLOWED}")
    return sign * seconds
