"""The ranged, resumable download of one file into a partial file beside the blobs.

The bytes land in a partial file, which a later download resumes from with HTTP
``Range`` instead of starting over. A file larger than ``part_size`` is fetched as
ranges of that size, several at once, each written at its offset; which bytes each
range holds is saved beside the partial file (``.partial.json``) before the first byte
and every second after, so a resumed download trusts only bytes it recorded. A smaller
file, or one whose size is unknown, is fetched in one stream appended to the partial
file, whose size is then the record. A server that ignores ``Range`` gets the whole file
fetched again in one stream. Checking the bytes and moving them into the store is the
caller's (``Store.commit_partial``).

The download runs on an event loop that may answer other requests (the library's), so
no disk access of it blocks that loop: bytes are gathered into batches of
``WRITE_BATCH`` and written by a worker thread (``asyncio.to_thread``), as are the
record, opening and truncating the file. A range's ``done`` grows only once its bytes
are written, so the record never claims bytes that are not on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from nodes.errors import PullFailed

log = logging.getLogger("corral.pull")

CHUNK = 256 * 1024  # bytes asked of the response body at a time
# Bytes of one range gathered before one write: large enough that a thread hop per write
# costs nothing beside it, small enough to bound the memory of parallel ranges.
WRITE_BATCH = 4 * 1024**2
STATE_INTERVAL = 1.0  # seconds between two saves of a download's ranges

# Opens a streamed GET with these extra headers (Range ...), on this client.
Opener = Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]


@dataclass
class Part:
    """Bytes ``start`` to ``end`` (exclusive; None: to the end) of a file, ``done`` of them."""

    start: int
    end: int | None
    done: int = 0

    @property
    def offset(self) -> int:
        """Where the next byte of this range goes."""
        return self.start + self.done

    @property
    def finished(self) -> bool:
        """Whether every byte of this range is written (never, while its end is unknown)."""
        return self.end is not None and self.offset >= self.end


class _RangeIgnored(Exception):
    """The server answered a ranged request with the whole file (or refused the range)."""


class _Retryable(Exception):
    """A failure that another try may not have: a 5xx, a body cut short."""


class Transfer:
    """One file downloading into ``partial``, in ranges, resumable (see module docstring).

    Building one reads what an earlier download left (the record, the partial's size);
    call it off the event loop (``asyncio.to_thread``) where that matters.
    """

    def __init__(
        self,
        partial: Path,
        total: int | None,
        part_size: int,
        label: str,
        *,
        validator: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.partial = partial
        self.state = partial.with_name(partial.name + ".json")
        self.total = total
        self.part_size = part_size
        self.label = label
        self.validator = validator  # ETag or Last-Modified: the same version of the file
        self.progress = progress or (lambda _: None)
        self.parts = self._plan()
        self.completed = sum(p.done for p in self.parts)
        self._saved_at = 0.0
        # Records are written by worker threads, and one cancelled while writing may still
        # be at it when the next starts: one writes at a time, and never an older record.
        self._writing = threading.Lock()
        self._taken = 0  # records taken so far
        self._written = 0  # which of them the file holds
        self._writes: set[asyncio.Task[None]] = set()  # of bytes, in worker threads now

    @property
    def recorded(self) -> bool:
        """Whether the ranges are written down (else the partial's size is the record)."""
        return len(self.parts) > 1 or self.validator is not None

    def _plan(self) -> list[Part]:
        saved = self._load()
        if saved is not None:
            return saved
        have = _size(self.partial)
        # A record that does not fit, a version we cannot check, more bytes than the file
        # has: the bytes are of another version of the file, or ranges we lost track of.
        too_long = self.total is not None and have > self.total
        if self.state.exists() or self.validator is not None or too_long:
            self.discard()
            have = 0
        if self.total is None or self.total - have <= self.part_size:
            return [Part(0, self.total, have)]
        prefix = [Part(0, have, have)] if have else []
        step = self.part_size
        return prefix + [Part(s, min(s + step, self.total)) for s in range(have, self.total, step)]

    def _load(self) -> list[Part] | None:
        try:
            saved = json.loads(self.state.read_text())
            parts = [
                Part(int(start), None if end is None else int(end), int(done))
                for start, end, done in saved["parts"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        same = saved.get("total") == self.total and saved.get("validator") == self.validator
        return parts if same and self.partial.is_file() else None

    def save(self) -> None:
        """Write down which bytes each range holds (blocking; nothing for one stream)."""
        if self.recorded:
            self._write_record(*self._record())

    async def _save(self) -> None:
        """``save`` by a worker thread, of the ranges as they stand now."""
        if self.recorded:
            await asyncio.to_thread(self._write_record, *self._record())

    def _record(self) -> tuple[int, dict[str, Any]]:
        self._saved_at = time.monotonic()
        self._taken += 1
        parts = [[p.start, p.end, p.done] for p in self.parts]
        return self._taken, {"total": self.total, "validator": self.validator, "parts": parts}

    def _write_record(self, number: int, record: dict[str, Any]) -> None:
        with self._writing:
            if number < self._written:
                return  # a newer record is there already
            tmp = self.state.with_name(self.state.name + ".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.state)
            self._written = number

    def discard(self) -> None:
        """Forget every byte downloaded so far."""
        self.partial.unlink(missing_ok=True)
        self.forget()

    def forget(self) -> None:
        """Drop the record of the ranges (the partial file is gone or committed)."""
        self.state.unlink(missing_ok=True)

    async def run(
        self, client: httpx.AsyncClient, opener: Opener, concurrency: int, retries: int
    ) -> None:
        """Fetch every byte not yet here, ``concurrency`` ranges at once; a range that
        fails is tried again ``retries`` times (resuming where it stopped)."""
        self.progress(self.completed)
        fd = await asyncio.to_thread(self._open)
        try:
            try:
                await self._fetch(client, opener, fd, concurrency, retries)
            except _RangeIgnored:
                log.info("%s: the server ignores Range; fetching it whole", self.label)
                await self._refetch(client, opener, fd, retries)
        finally:
            if self._writes:  # a cancelled range's last write may still be running
                await asyncio.wait(self._writes)
            await asyncio.to_thread(self._close, fd)

    def _open(self) -> int:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.save()  # the record exists before the first byte it describes
        return os.open(self.partial, os.O_WRONLY | os.O_CREAT, 0o644)

    def _close(self, fd: int) -> None:
        os.close(fd)
        finished = all(p.finished for p in self.parts)
        if not finished and _size(self.partial) == 0:
            self.discard()  # nothing worth resuming from
        elif not finished:
            self.save()

    async def _refetch(
        self, client: httpx.AsyncClient, opener: Opener, fd: int, retries: int
    ) -> None:
        """Everything again, in one stream from the first byte."""
        await asyncio.to_thread(os.ftruncate, fd, 0)
        self.parts, self.completed = [Part(0, self.total)], 0
        self.progress(0)
        await self._save()
        try:
            await self._fetch(client, opener, fd, 1, retries)
        except _RangeIgnored:
            raise PullFailed(
                f"Downloading {self.label} failed: the connection broke, and the server cannot "
                f"resume (it ignores Range requests)."
            ) from None

    async def _fetch(
        self,
        client: httpx.AsyncClient,
        opener: Opener,
        fd: int,
        concurrency: int,
        retries: int,
    ) -> None:
        pending = deque(p for p in self.parts if not p.finished)

        async def worker() -> None:
            while pending:
                await self._fetch_part(client, opener, fd, pending.popleft(), retries)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, len(pending))):
                    group.create_task(worker())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def _fetch_part(
        self, client: httpx.AsyncClient, opener: Opener, fd: int, part: Part, retries: int
    ) -> None:
        failures = 0
        while not part.finished:
            before = part.offset
            try:
                await self._stream(client, opener, fd, part)
            except (httpx.TransportError, _Retryable) as exc:
                failures = 1 if part.offset > before else failures + 1
                if failures > retries:
                    raise PullFailed(
                        f"Downloading {self.label} failed after {failures} tries: {describe(exc)}."
                    ) from None
                log.info("%s: %s; trying again", self.label, describe(exc))
                await asyncio.sleep(min(0.25 * 2 ** (failures - 1), 5.0))
                continue
            except httpx.HTTPError as exc:  # too many redirects, a body it cannot decode ...
                raise PullFailed(f"Downloading {self.label} failed: {describe(exc)}.") from None
            if part.end is None:
                part.end = part.offset  # the whole body came: that was all of it

    async def _stream(self, client: httpx.AsyncClient, opener: Opener, fd: int, part: Part) -> None:
        whole = len(self.parts) == 1 and part.offset == 0
        headers = {"Accept-Encoding": "identity"}
        if not whole:
            last = "" if part.end is None else part.end - 1
            headers["Range"] = f"bytes={part.offset}-{last}"
        response = await opener(client, headers)
        held = bytearray()  # received, not written yet
        try:
            self._check(response, part, whole)
            async for chunk in response.aiter_bytes(CHUNK):
                if part.end is not None:
                    chunk = chunk[: part.end - part.offset - len(held)]
                held += chunk
                ends = part.end is not None and part.offset + len(held) >= part.end
                if len(held) >= WRITE_BATCH or ends:
                    batch, held = held, bytearray()
                    await self._write(fd, part, batch)
                if part.finished:
                    break
        finally:
            try:
                if held:  # what came before a cut is kept, so the next try asks for less
                    await self._write(fd, part, held)
            finally:
                await response.aclose()
        if part.end is not None and not part.finished:
            raise _Retryable(f"{response.url.host} ended the response early")

    async def _write(self, fd: int, part: Part, data: bytearray) -> None:
        """``data`` at ``part``'s offset, by a worker thread; then it counts as done.

        A write that started finishes even if the download is cancelled, and ``run``
        waits for it before closing ``fd``: a write after the close could land in
        whichever file reuses the descriptor's number.
        """
        write = asyncio.ensure_future(asyncio.to_thread(_write_at, fd, data, part.offset))
        self._writes.add(write)
        write.add_done_callback(self._write_done)
        await asyncio.shield(write)
        part.done += len(data)
        self.completed += len(data)
        self.progress(self.completed)
        if time.monotonic() - self._saved_at >= STATE_INTERVAL:
            await self._save()

    def _write_done(self, write: asyncio.Task[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled():
            write.exception()  # its waiter, if any is left, raised it; no warning besides

    def _check(self, response: httpx.Response, part: Part, whole: bool) -> None:
        status = response.status_code
        if status == 200 and whole:
            return
        if status == 206 and not whole:
            if _range_start(response.headers.get("content-range", "")) != part.offset:
                raise PullFailed(
                    f"Downloading {self.label} failed: {response.url.host} sent the range "
                    f"{response.headers.get('content-range')!r} for bytes from {part.offset}."
                )
            return
        if status in (200, 416):
            raise _RangeIgnored
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"{response.url} answered {status} {response.reason_phrase}")
        raise PullFailed(
            f"Downloading {self.label} failed: the server answered {status} "
            f"{response.reason_phrase}."
        )


def url_opener(url: str, headers: dict[str, str] | None = None) -> Opener:
    """An ``Opener`` of a plain URL, sending ``headers`` (credentials) with every request."""

    async def open_(client: httpx.AsyncClient, extra: dict[str, str]) -> httpx.Response:
        request = client.build_request("GET", url, headers={**(headers or {}), **extra})
        return await client.send(request, stream=True)

    return open_


async def probe(url: str, timeout: httpx.Timeout) -> tuple[int | None, str | None]:
    """The size and version (ETag or Last-Modified) a HEAD of ``url`` gives, if any."""
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            response = await client.head(url, headers={"Accept-Encoding": "identity"})
    except httpx.HTTPError:
        return None, None  # the GET will say what is wrong
    if response.status_code != 200:
        return None, None
    length = response.headers.get("content-length")
    validator = response.headers.get("etag") or response.headers.get("last-modified")
    return (int(length) if length and length.isdigit() else None), validator


def describe(exc: BaseException) -> str:
    """An exception as a user reads it: its type, and its message if it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _range_start(content_range: str) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)$", content_range.strip())
    return int(match[1]) if match else None


def _write_at(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
