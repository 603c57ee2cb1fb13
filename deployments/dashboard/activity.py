"""What the API served, per model, in short buckets over the last minutes: the
dashboard's charts of requests/s, tokens/s and time to first token.

Every generation passes through the ingress, which records it here (through
``ApiMetrics``); Prometheus keeps the long history, this keeps the last
``WINDOW`` seconds in memory so that the page can draw them without one. An
ingress that restarts starts with an empty window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

BUCKET = 5.0  # seconds per point of the charts
WINDOW = 15 * 60.0  # seconds the charts show
RATE_OVER = 10.0  # seconds a placement's "tokens/s now" averages over


@dataclass(slots=True)
class _Bucket:
    requests: int = 0  # generations that ended in it
    tokens: int = 0  # tokens generated in it (a generation's, spread over its decoding)
    ttft_sum: float = 0.0  # seconds to first token of the generations that began in it
    ttft_n: int = 0


class Activity:
    """Per model, buckets of ``bucket`` seconds over the last ``window`` seconds."""

    def __init__(
        self,
        bucket: float = BUCKET,
        window: float = WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket = bucket
        self.window = window
        self._clock = clock
        self._models: dict[str, dict[int, _Bucket]] = {}

    def _at(self, model: str, now: float) -> _Bucket:
        index = math.floor(now / self.bucket)
        buckets = self._models.setdefault(model, {})
        found = buckets.get(index)
        if found is None:
            found = buckets[index] = _Bucket()
            self._trim(now)
        return found

    def _trim(self, now: float) -> None:
        oldest = math.floor((now - self.window) / self.bucket)
        for model, buckets in list(self._models.items()):
            for index in [i for i in buckets if i < oldest]:
                del buckets[index]
            if not buckets:
                del self._models[model]

    def first_token(self, model: str, seconds: float) -> None:
        b = self._at(model, self._clock())
        b.ttft_sum += seconds
        b.ttft_n += 1

    def finished(self, model: str, tokens: int, decoding: float = 0.0) -> None:
        """A generation ended now with ``tokens`` generated over the last ``decoding``
        seconds: its tokens are spread over the buckets it decoded in."""
        now = self._clock()
        self._at(model, now).requests += 1
        start = now - min(max(decoding, 0.0), self.window)
        for index in range(math.floor(start / self.bucket), math.floor(now / self.bucket) + 1):
            lo, hi = max(start, index * self.bucket), min(now, (index + 1) * self.bucket)
            share = (hi - lo) / (now - start) if now > start else 1.0
            self._at(model, lo).tokens += round(tokens * share)

    def series(self, since: float | None = None) -> dict[str, list[list[float | None]]]:
        """Per model with activity in the window, ``[t, requests, tokens, mean ttft]`` for
        every bucket from ``since`` (default: the window's start) to now, empty ones too;
        ``t`` is the bucket's start (epoch seconds); the mean is None with no first token."""
        now = self._clock()
        self._trim(now)
        first = math.floor(max(since or 0.0, now - self.window) / self.bucket)
        last = math.floor(now / self.bucket)
        out = {}
        for model, buckets in sorted(self._models.items()):
            rows: list[list[float | None]] = []
            for index in range(first, last + 1):
                b = buckets.get(index) or _Bucket()
                ttft = round(b.ttft_sum / b.ttft_n, 4) if b.ttft_n else None
                rows.append([index * self.bucket, b.requests, b.tokens, ttft])
            out[model] = rows
        return out

    def tokens_per_second(self, model: str, over: float = RATE_OVER) -> float:
        """``model``'s generated tokens per second over the last ``over`` seconds (whole
        buckets: the current one and those before it)."""
        now = self._clock()
        buckets = self._models.get(model, {})
        last = math.floor(now / self.bucket)
        count = max(1, math.ceil(over / self.bucket))
        tokens = sum(buckets[i].tokens for i in range(last - count + 1, last + 1) if i in buckets)
        # The current bucket is only partly over: divide by the time actually covered.
        covered = (count - 1) * self.bucket + (now - last * self.bucket)
        return round(tokens / covered, 2) if covered > 0 else 0.0
