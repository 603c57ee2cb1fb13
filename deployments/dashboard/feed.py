"""The dashboard's live feed: one poll of the controller for every open tab.

While at least one tab listens, one task asks the controller every ``INTERVAL``
for the nodes, the placements and the new events, and each tab's stream sends
what its key may see of that snapshot as a Server-Sent Event. Ten open tabs cost
the controller what one costs. A tab's first snapshot carries the last 100
events and the charts' whole window; later ones only what is new.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.auth import Grant
from deployments.backend import ModelBackend
from deployments.dashboard.activity import Activity
from deployments.views import Event, NodeStatus, PlacementView

log = logging.getLogger("corral.dashboard")

INTERVAL = 2.0  # seconds between snapshots
ASK_TIMEOUT = 5.0  # seconds a poll waits for the controller
EVENTS_KEPT = 200
FIRST_EVENTS = 100  # events a tab gets when it connects


@dataclass
class Snapshot:
    time: float
    nodes: list[NodeStatus]
    placements: list[PlacementView]
    events: list[Event]  # the last EVENTS_KEPT, oldest first
    error: str | None = None  # why the controller's part is old or missing
    seq: int = 0


@dataclass(eq=False)
class _Listener:
    """One open tab: its key, and what it has been sent."""

    grant: Grant | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = -1  # the last snapshot sent
    last_event: float | None = None  # the time of the last event sent
    charts_since: float | None = None  # None: the charts' whole window is still to send

    def next(self, snap: Snapshot, activity: Activity) -> dict[str, Any]:
        """``snap`` for this tab, with only what it has not been sent of events and charts."""
        if self.last_event is None:
            events = snap.events[-FIRST_EVENTS:]
        else:
            events = [e for e in snap.events if e.time > self.last_event]
        self.last_event = events[-1].time if events else (self.last_event or 0.0)
        series = activity.series(self.charts_since)
        charts = {"bucket": activity.bucket, "full": self.charts_since is None, "series": series}
        rates = {m: activity.tokens_per_second(m) for m in series}
        self.charts_since = snap.time - activity.bucket  # the last bucket may have grown
        self.seq = snap.seq
        return view(snap, events, charts, rates, self.grant)


class Feed:
    """Snapshots of the cluster for the dashboard's streams (see module docstring)."""

    def __init__(
        self, backend: ModelBackend, activity: Activity, interval: float = INTERVAL
    ) -> None:
        self._backend = backend
        self._activity = activity
        self._interval = interval
        self._listeners: set[_Listener] = set()
        self._task: asyncio.Task[None] | None = None
        self._latest: Snapshot | None = None
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._seq = 0  # snapshots taken, across polling tasks

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def stream(self, grant: Grant | None, limit: int | None = None) -> AsyncIterator[str]:
        """Server-Sent Events of snapshots as ``grant`` may see them; ``limit`` ends the
        stream after that many."""
        me = _Listener(grant)
        self._listeners.add(me)
        self._ensure_polling()
        sent = 0
        try:
            while limit is None or sent < limit:
                snap = self._latest
                if snap is None or snap.seq == me.seq:
                    me.wake.clear()
                    await me.wake.wait()
                    continue
                body = json.dumps(me.next(snap, self._activity), separators=(",", ":"))
                yield f"event: snapshot\ndata: {body}\n\n"
                sent += 1
        finally:
            self._listeners.discard(me)

    def _ensure_polling(self) -> None:
        if self._task is None or self._task.done():
            self._latest = None  # taken before the last tab closed: too old to show
            self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        """Take a snapshot every interval while anyone listens."""
        while self._listeners:
            started = time.monotonic()
            self._seq += 1
            self._latest = await self._take(self._seq)
            for listener in list(self._listeners):
                listener.wake.set()
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))
        self._task = None

    async def _take(self, seq: int) -> Snapshot:
        since = self._events[-1].time if self._events else 0.0
        previous = self._latest
        try:
            nodes, placements, events = await asyncio.wait_for(
                asyncio.gather(
                    self._backend.cluster_nodes(),
                    self._backend.cluster_placements(),
                    self._backend.cluster_events(since),
                ),
                ASK_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - the page says so and keeps what it had
            why = f"no answer in {ASK_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else str(exc)
            if previous is None or previous.error is None:
                log.warning("dashboard: the controller did not answer: %s", why)
            old = previous or Snapshot(time.time(), [], [], [])
            return Snapshot(time.time(), old.nodes, old.placements, list(self._events), why, seq)
        seen = {(e.time, e.kind, e.model, e.node) for e in self._events}
        for e in events:
            if (e.time, e.kind, e.model, e.node) not in seen:
                self._events.append(e)
        return Snapshot(time.time(), nodes, placements, list(self._events), None, seq)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def view(
    snap: Snapshot,
    events: list[Event],
    activity: dict[str, Any],
    rates: dict[str, float],
    grant: Grant | None,
) -> dict[str, Any]:
    """What one tab is sent of ``snap``: a key limited to some models sees those models'
    placements, events and charts, and no nodes. ``activity`` is the charts' part
    (bucket, full, series by model); ``rates`` each model's tokens/s now."""

    def allowed(model: object) -> bool:
        return grant is None or grant.allows(str(model))

    limited = grant is not None and grant.limited
    return {
        "type": "snapshot",  # as the event's name, like Anthropic's and the Responses API's
        "time": snap.time,
        "error": snap.error,
        "nodes": None if limited else node_views(snap.nodes, snap.placements),
        "placements": [
            {
                **p.model_dump(mode="json"),
                "queued": max(0, p.in_flight - p.slots),
                "tokens_per_s": rates.get(p.model, 0.0),
            }
            for p in snap.placements
            if allowed(p.model)
        ],
        "events": [e.model_dump(mode="json") for e in events if allowed(e.model)],
        "activity": {
            **activity,
            "series": {m: rows for m, rows in activity["series"].items() if allowed(m)},
        },
    }


def node_views(nodes: list[NodeStatus], placements: list[PlacementView]) -> list[dict[str, Any]]:
    """Each node with the RAM and VRAM its placements hold (``ram_models``,
    ``vram_models``), and its GPUs' VRAM summed (``vram_total``, ``vram_used``)."""
    held: dict[str, tuple[int, int]] = {}
    for p in placements:
        ram, vram = held.get(p.node, (0, 0))
        held[p.node] = (ram + p.ram * p.replicas, vram + p.vram * p.replicas)
    out = []
    for n in nodes:
        ram_models, vram_models = held.get(n.name, (0, 0))
        out.append(
            {
                **n.model_dump(mode="json"),
                "ram_models": ram_models,
                "vram_models": vram_models,
                "vram_total": sum(g.vram_total for g in n.gpus) if n.gpus else None,
                "vram_used": sum(g.vram_used for g in n.gpus) if n.gpus else None,
            }
        )
    return out
