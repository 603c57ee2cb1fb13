"""A streamed chat completion read on a thread, for tests that break something while it
flows (a box unplugged, a process killed) and then look at how it ended."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Stream:
    """One streamed chat completion, read on a thread: its SSE events as they came."""

    events: list[str] = field(default_factory=list)
    status: int | None = None
    ended_at: float | None = None  # time.monotonic() when the stream closed
    failure: BaseException | None = None

    @property
    def content(self) -> int:
        return sum('"content"' in e for e in self.events)

    @property
    def error(self) -> dict | None:
        last = self.events[-1] if self.events else ""
        return json.loads(last)["error"] if last.startswith('{"error"') else None


def start_stream(url: str, model: str, **fields) -> Stream:
    """``POST /v1/chat/completions`` with ``stream`` on (and ``fields`` in the body)."""
    stream = Stream()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    body.update(fields)

    def read() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                stream.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        stream.events.append(line[6:])
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            stream.failure = exc
        finally:
            stream.ended_at = time.monotonic()

    threading.Thread(target=read, daemon=True).start()
    return stream
