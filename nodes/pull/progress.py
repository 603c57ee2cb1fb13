"""Progress: Ollama's progress objects for a pull, and how one download's progress
reaches every caller waiting for it.

``Progress`` turns a file's byte count into ``{"status": "pulling <12 hex>", "digest",
"total", "completed"}`` objects, at most ten a second, the last one complete.
``Broadcast`` copies one pull's objects to every caller following it (a caller who joins
late first gets where each layer stands now); ``BlobDownload`` passes one blob's byte
count to the ``Progress`` of every pull that needs that blob.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRESS_INTERVAL = 0.1  # seconds between two progress objects of a blob, per pull

Emit = Callable[[dict[str, Any]], None]


class Broadcast:
    """One pull's progress objects, copied to the queue of every caller following it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self._queues: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._latest: dict[str, dict[str, Any]] = {}  # where each layer stands

    def publish(self, event: dict[str, Any]) -> None:
        """Send ``event`` to every follower, and remember it for those who join later."""
        self._latest[event.get("digest") or event["status"]] = event
        for queue in self._queues:
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        """A new follower's queue, holding where each layer stands now; None ends it."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for event in self._latest.values():
            queue.put_nowait(event)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        """A follower stops listening (the pull goes on for the others)."""
        self._queues.discard(queue)

    def close(self) -> None:
        """The pull ended: every follower's queue gets None."""
        for queue in self._queues:
            queue.put_nowait(None)


class BlobDownload:
    """A blob being fetched, and the progress of every pull waiting for it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Path] | None = None
        self.completed = 0
        self.listeners: set[Progress] = set()

    def __call__(self, completed: int) -> None:
        self.completed = completed
        for listener in list(self.listeners):
            listener(completed)


class Progress:
    """Ollama's progress objects for one file of one pull, at most ten a second."""

    def __init__(self, emit: Emit, status: str, digest: str | None, total: int | None) -> None:
        self.emit, self.status, self.digest, self.total = emit, status, digest, total
        self._sent = -1
        self._at = 0.0

    def __call__(self, completed: int) -> None:
        now = time.monotonic()
        done = self.total is not None and completed >= self.total
        if completed == self._sent or (not done and now - self._at < PROGRESS_INTERVAL):
            return
        self._send(completed, now)

    def finish(self, completed: int) -> None:
        """The last object, complete (a file of unknown size is done when its body ends)."""
        self.total = completed
        if completed != self._sent:
            self._send(completed, time.monotonic())

    def _send(self, completed: int, now: float) -> None:
        self._sent, self._at = completed, now
        event: dict[str, Any] = {"status": self.status}
        if self.digest:
            event["digest"] = self.digest
        event |= {"total": self.total or 0, "completed": completed}
        self.emit(event)
