"""How an interrupted download plans its resumption, and that its writes stay off the
event loop."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import httpx

from nodes.pull import transfer as transfer_module
from nodes.pull.transfer import WRITE_BATCH, Part, Transfer, url_opener

# -- resuming --


def test_a_fresh_download_is_split_into_ranges(tmp_path):
    transfer = Transfer(tmp_path / "x.partial", 100, 30, "x")
    assert transfer.parts == [Part(0, 30), Part(30, 60), Part(60, 90), Part(90, 100)]
    assert Transfer(tmp_path / "y.partial", 30, 30, "y").parts == [Part(0, 30)]
    assert Transfer(tmp_path / "z.partial", None, 30, "z").parts == [Part(0, None)]


def test_a_stream_resumes_from_the_partial_files_size(tmp_path):
    partial = tmp_path / "x.partial"
    partial.write_bytes(b"x" * 45)  # one stream, appended: its size is the record
    transfer = Transfer(partial, 100, 30, "x")
    assert transfer.parts == [Part(0, 45, 45), Part(45, 75), Part(75, 100)]
    assert transfer.completed == 45
    partial.write_bytes(b"x" * 10)
    assert Transfer(partial, 20, 30, "x").parts == [Part(0, 20, 10)]


def test_ranges_resume_from_their_record_and_nothing_else(tmp_path):
    partial = tmp_path / "x.partial"
    partial.write_bytes(b"\0" * 100)
    state = tmp_path / "x.partial.json"
    record = {"total": 100, "validator": None, "parts": [[0, 50, 20], [50, 100, 50]]}
    state.write_text(json.dumps(record))
    assert Transfer(partial, 100, 30, "x").parts == [Part(0, 50, 20), Part(50, 100, 50)]
    # the file changed size since: nothing of it can be trusted
    assert Transfer(partial, 120, 30, "x").parts == [Part(0, 30), *_parts(30, 120, 30)]
    assert not partial.exists() and not state.exists()


def test_a_url_resumes_only_the_same_version(tmp_path):
    partial = tmp_path / "x.partial"
    first = Transfer(partial, 100, 200, "x", validator='"v1"')
    partial.write_bytes(b"x" * 40)
    first.parts[0].done = 40
    first.save()
    assert Transfer(partial, 100, 200, "x", validator='"v1"').parts == [Part(0, 100, 40)]
    assert Transfer(partial, 100, 200, "x", validator='"v2"').parts == [Part(0, 100)]
    assert not partial.exists()


# -- writing --


def ranged_server(body: bytes) -> httpx.MockTransport:
    """A server of ``body`` that honours ``Range`` as a registry's blob store does."""

    def serve(request: httpx.Request) -> httpx.Response:
        wanted = request.headers.get("range")
        if wanted is None:
            return httpx.Response(200, content=body)
        first, last = wanted.removeprefix("bytes=").split("-")
        start, end = int(first), (int(last) + 1 if last else len(body))
        headers = {"content-range": f"bytes {start}-{end - 1}/{len(body)}"}
        return httpx.Response(206, headers=headers, content=body[start:end])

    return httpx.MockTransport(serve)


def test_the_bytes_are_written_in_batches_off_the_event_loop(tmp_path, monkeypatch):
    body = os.urandom(3 * WRITE_BATCH + 12345)
    writers: list[tuple[int, int]] = []  # (thread, bytes) of each write
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        writers.append((threading.get_ident(), len(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(transfer_module.os, "pwrite", pwrite)
    partial = tmp_path / "x.partial"
    part_size = 2 * WRITE_BATCH
    seen: list[int] = []

    async def run() -> int:
        transfer = Transfer(partial, len(body), part_size, "x", progress=seen.append)
        async with httpx.AsyncClient(transport=ranged_server(body)) as client:
            await transfer.run(client, url_opener("http://blobs.test/x"), 2, 0)
        assert all(p.finished for p in transfer.parts)
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert partial.read_bytes() == body
    assert writers and loop_thread not in {thread for thread, _ in writers}
    # one write per batch (and a shorter one at each range's end), not one per chunk
    assert len(writers) <= len(body) // WRITE_BATCH + 2
    assert seen == sorted(seen) and seen[-1] == len(body)


def _parts(start: int, total: int, size: int) -> list[Part]:
    return [Part(s, min(s + size, total)) for s in range(start, total, size)]
