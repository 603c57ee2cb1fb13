"""The dashboard's server side without Ray: the charts' buckets, what each key's tab is
sent, and the feed's one poll for every tab (over ``LocalBackend``)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from deployments.auth import Grant
from deployments.dashboard.activity import Activity
from deployments.dashboard.feed import Feed, Snapshot, node_views, view
from deployments.views import Event, GpuStatus, NodeStatus
from tests.support.views import placement_view

GIB = 1024**3


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_activity_buckets_requests_tokens_and_first_tokens():
    clock = Clock(1000.0)
    activity = Activity(bucket=5, window=60, clock=clock)
    activity.first_token("a:1", 0.2)
    clock.now = 1001.0
    activity.first_token("a:1", 0.4)
    clock.now = 1009.0  # decoded from 1001 to 1009: half of it in the bucket 1000-1005
    activity.finished("a:1", 80, 8.0)
    rows = activity.series()["a:1"]
    assert rows[-2:] == [[1000.0, 0, 40, 0.3], [1005.0, 1, 40, None]]
    assert rows[0][0] == 945.0 and len(rows) == 13  # the window, empty buckets included
    assert activity.series(since=1004.0)["a:1"] == rows[-2:]
    # 80 tokens over the last 10 s (two buckets, the current one 4 s old: 9 s covered)
    assert activity.tokens_per_second("a:1", over=10) == pytest.approx(80 / 9, abs=0.01)
    assert activity.tokens_per_second("other:1") == 0.0


def test_activity_forgets_what_left_the_window():
    clock = Clock(1000.0)
    activity = Activity(bucket=5, window=60, clock=clock)
    activity.finished("a:1", 3)
    clock.now = 1100.0
    assert activity.series() == {}
    activity.finished("b:1", 3)
    assert list(activity.series()) == ["b:1"]


def node(name: str, state: str, gpus: list[GpuStatus], models: list[str]) -> NodeStatus:
    return NodeStatus(
        name=name, node_id=name, address="", role="worker", state=state, gpus=gpus, models=models
    )


def event(time: float, kind: str, model: str, node: str, reason: str) -> Event:
    return Event(time=time, kind=kind, model=model, node=node, reason=reason, category=reason)


NODES = [
    node("minipc", "up", [], ["a:1"]),
    node(
        "gpubox",
        "down",
        [
            GpuStatus(name="RTX 3090", vram_total=24 * GIB, vram_used=2 * GIB),
            GpuStatus(name="RTX 3060", vram_total=12 * GIB, vram_used=GIB),
        ],
        ["b:1"],
    ),
]
PLACEMENTS = [
    placement_view("a:1", "minipc", replicas=2, ram=GIB, vram=0, in_flight=6, slots=4),
    placement_view("b:1", "gpubox", replicas=1, ram=GIB, vram=3 * GIB, in_flight=1, slots=4),
]
EVENTS = [
    event(1.0, "load", "a:1", "minipc", "asked"),
    event(2.0, "lost", "b:1", "gpubox", "gone"),
]


def test_node_views_count_what_models_hold_and_sum_the_gpus():
    minipc, gpubox = node_views(NODES, PLACEMENTS)
    assert (minipc["ram_models"], minipc["vram_models"], minipc["vram_total"]) == (
        2 * GIB,
        0,
        None,
    )
    assert (gpubox["ram_models"], gpubox["vram_models"]) == (GIB, 3 * GIB)
    assert (gpubox["vram_total"], gpubox["vram_used"]) == (36 * GIB, 3 * GIB)


def test_a_limited_key_sees_its_models_and_no_nodes():
    snap = Snapshot(10.0, NODES, PLACEMENTS, EVENTS)
    charts = {"bucket": 5, "full": True, "series": {"a:1": [[0, 1, 2, 0.1]], "b:1": []}}
    everything = view(snap, EVENTS, charts, {"a:1": 3.5}, None)
    assert [n["name"] for n in everything["nodes"]] == ["minipc", "gpubox"]
    a, b = everything["placements"]
    assert (a["queued"], a["tokens_per_s"], b["queued"], b["tokens_per_s"]) == (2, 3.5, 0, 0.0)
    assert len(everything["events"]) == 2 and set(everything["activity"]["series"]) == {
        "a:1",
        "b:1",
    }

    only_b = view(snap, EVENTS, charts, {}, Grant("k", "bob", frozenset({"b:1"})))
    assert only_b["nodes"] is None
    assert [p["model"] for p in only_b["placements"]] == ["b:1"]
    assert [e["model"] for e in only_b["events"]] == ["b:1"]
    assert list(only_b["activity"]["series"]) == ["b:1"]
    assert "a:1" not in json.dumps(only_b)


class CountingBackend:
    """The three things a feed asks, counted."""

    def __init__(self) -> None:
        self.asked = 0
        self.events = list(EVENTS)

    async def cluster_nodes(self):
        self.asked += 1
        return NODES

    async def cluster_placements(self):
        return PLACEMENTS

    async def cluster_events(self, since: float = 0.0):
        return [e for e in self.events if e.time >= since]


def parse(chunk: str) -> dict:
    event, data = chunk.strip().split("\n")
    assert event == "event: snapshot"
    return json.loads(data.removeprefix("data: "))


def test_one_poll_serves_every_tab_and_each_gets_only_what_is_new():
    async def main():
        backend = CountingBackend()
        feed = Feed(backend, Activity(), interval=0.05)  # type: ignore[arg-type]
        tabs = [feed.stream(None, limit=3) for _ in range(3)]
        firsts = [parse(await anext(t)) for t in tabs]
        assert all(len(f["events"]) == 2 and f["activity"]["full"] for f in firsts)
        backend.events.append(event(3.0, "replace", "b:1", "minipc", "x"))

        async def rest(tab):
            return [parse(c) async for c in tab]

        later = await asyncio.gather(*(rest(t) for t in tabs))
        for snapshots in later:
            assert [e["kind"] for s in snapshots for e in s["events"]] == ["replace"]
            assert not any(s["activity"]["full"] for s in snapshots)
        # Three tabs, three snapshots each: the controller was asked once per interval.
        assert backend.asked <= 4
        await asyncio.sleep(0.15)
        assert feed.listeners == 0 and feed._task is None  # nobody listens: no more polls

    asyncio.run(main())


def test_a_controller_that_does_not_answer_keeps_the_last_view_and_says_why():
    class Failing(CountingBackend):
        async def cluster_nodes(self):
            self.asked += 1
            if self.asked > 1:
                raise RuntimeError("the controller actor died")
            return NODES

    async def main():
        feed = Feed(Failing(), Activity(), interval=0.02)  # type: ignore[arg-type]
        snapshots = [parse(c) async for c in feed.stream(None, limit=2)]
        assert snapshots[0]["error"] is None
        assert snapshots[1]["error"] == "the controller actor died"
        assert [n["name"] for n in snapshots[1]["nodes"]] == ["minipc", "gpubox"]

    asyncio.run(main())


def test_the_page_refers_only_to_files_it_ships():
    """Every /ui/static/ path in the page and every module a script imports exists in the
    package's static folder (pyproject's package-data ships it all): nothing from a CDN."""
    from deployments.dashboard.routes import STATIC

    page = (STATIC / "index.html").read_text()
    assert "http://" not in page and "https://" not in page
    wanted = set(re.findall(r'"/ui/static/([^"]+)"', page))
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        assert not re.search(r"""from\s+["']https?:""", text), script.name
        wanted |= set(re.findall(r"""from\s+["']\./([^"']+)["']""", text))
    assert "app.js" in wanted and "vendor/uplot/uPlot.iife.min.js" in wanted
    assert sorted(w for w in wanted if not (STATIC / w).is_file()) == []
