"""The puller without a network: a bad name fails before any progress, local imports,
and one import shared by two callers. (Pulls over HTTP from a real registry:
tests/integration/test_registry.py.)"""

from __future__ import annotations

import asyncio
import threading

import pytest

from nodes.errors import InvalidRequest
from nodes.pull import Puller
from nodes.store import Store


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../b",
        "x:..",
        "https://example.com/readme.md",
        "https://example.com/%2e%2e.gguf",
        "https:///x.gguf",
        "http://[::1/x.gguf",
        "/etc/passwd",
        "/srv/.gguf",
        "hf.co/org/../repo",
        "",
    ],
)
def test_a_bad_name_fails_before_any_progress(tmp_path, name):
    puller = Puller(Store(tmp_path))

    async def first():
        return await anext(aiter(puller.pull(name)))

    with pytest.raises(InvalidRequest):
        asyncio.run(first())
    assert not any(tmp_path.iterdir())


# -- local files --


def collect(puller: Puller, name: str) -> list[dict]:
    async def run():
        return [event async for event in puller.pull(name)]

    return asyncio.run(run())


def test_a_local_gguf_is_imported(tmp_path, starter_path):
    source = tmp_path / "SmolLM2 135M.gguf"
    source.hardlink_to(starter_path)
    store = Store(tmp_path / "store")
    events = collect(Puller(store), str(source))
    copying = [e for e in events if e["status"] == "importing SmolLM2 135M.gguf"]
    assert copying and copying[-1]["completed"] == copying[-1]["total"] == source.stat().st_size
    completed = [e["completed"] for e in copying]
    assert completed == sorted(completed)
    assert [e["status"] for e in events[len(copying) :]] == ["writing manifest", "success"]
    model = store.get("smollm2-135m")
    assert open(model.path, "rb").read() == starter_path.read_bytes()
    assert model.details.quantization_level == "Q4_1"


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidRequest, match="not a GGUF file"):
        collect(Puller(store), str(bad))
    with pytest.raises(InvalidRequest, match="does not exist"):
        collect(Puller(store), str(tmp_path / "missing.gguf"))
    assert not store.root.exists()


def test_two_callers_of_one_pull_share_it_and_one_leaving_stops_nothing(
    tmp_path, starter_path, monkeypatch
):
    source = tmp_path / "shared.gguf"
    source.hardlink_to(starter_path)
    store = Store(tmp_path / "store")
    copies = []
    release = threading.Event()
    real_add_file = store.add_file

    def slow_add_file(path, digest=None, progress=None):
        copies.append(path)
        release.wait(10)
        return real_add_file(path, digest, progress)

    monkeypatch.setattr(store, "add_file", slow_add_file)
    puller = Puller(store)

    async def run():
        leaver = puller.pull(str(source))
        stayer = puller.pull(str(source))
        await asyncio.sleep(0)
        stay = asyncio.create_task(anext(stayer))  # both wait for the same import
        await asyncio.sleep(0.05)
        release.set()
        first = await anext(leaver)
        await leaver.aclose()  # the first caller leaves after one object
        rest = [await stay] + [event async for event in stayer]
        return first, rest

    first, rest = asyncio.run(run())
    assert len(copies) == 1
    assert first["status"].startswith("importing")
    assert rest[-1] == {"status": "success"}
    assert open(store.get("shared:latest").path, "rb").read() == starter_path.read_bytes()
