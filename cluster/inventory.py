"""The inventory of every node in the cluster: what it has, what is free, what runs there.

Two sources are merged: Ray's GCS (which nodes exist, alive or dead, and the
resources and labels each started with) and a probe task pinned to each live
node (its hardware and live RAM/VRAM use, read on that node). A node that GCS
calls dead, or whose probe has not answered for ``stale_after`` seconds, is
shown as down; a node that joins shows up at the next refresh.

``merge`` is pure (plain data and the time in, statuses out);
``InventoryMonitor`` does the Ray calls around it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deployments.views import GpuStatus, NodeStatus
from nodes.agent import LABEL_NODE, LABEL_ROLE, VRAM_RESOURCE
from nodes.hardware import NodeInventory, current_inventory

MIB = 1024**2


@dataclass(frozen=True, slots=True)
class RayNode:
    """A node as Ray's GCS knows it."""

    node_id: str
    alive: bool
    address: str
    labels: dict[str, str]
    resources: dict[str, float]


@dataclass(slots=True)
class ProbeResult:
    inventory: NodeInventory
    at: float  # when it answered


def merge(
    nodes: list[RayNode],
    probes: dict[str, ProbeResult],
    first_seen: dict[str, float],
    models: dict[str, list[str]],
    now: float,
    stale_after: float,
) -> list[NodeStatus]:
    """Statuses for ``nodes``: head first, then by name; a dead node is hidden by a live
    node of the same name (the same box, rejoined)."""
    live_names = {_name(n) for n in nodes if n.alive}
    rows = []
    for node in nodes:
        if not node.alive and _name(node) in live_names:
            continue
        probe = probes.get(node.node_id)
        last_answer = probe.at if probe else first_seen.get(node.node_id, now)
        state, note = node_state(node.alive, now - last_answer, stale_after)
        row = _status(node, probe, models.get(node.node_id, []), state, note)
        row.since = first_seen.get(node.node_id) if state == "up" else last_answer
        rows.append(row)
    return sorted(rows, key=lambda r: (r.role != "head", r.name, r.state != "up"))


def node_state(
    alive: bool, silent_for: float, stale_after: float
) -> tuple[Literal["up", "down"], str | None]:
    """Up, or down with the reason: GCS lost it, or its probe stopped answering."""
    if not alive:
        return "down", "left the cluster or stopped answering Ray"
    if silent_for > stale_after:
        return "down", f"no answer for {silent_for:.0f} s"
    return "up", None


def _name(node: RayNode) -> str:
    return node.labels.get(LABEL_NODE) or node.address or node.node_id[:12]


def _status(
    node: RayNode,
    probe: ProbeResult | None,
    models: list[str],
    state: Literal["up", "down"],
    note: str | None,
) -> NodeStatus:
    status = NodeStatus(
        name=_name(node),
        node_id=node.node_id,
        address=node.address,
        role=node.labels.get(LABEL_ROLE, "-"),
        state=state,
        ram_offered=int(node.resources.get("memory", 0)),
        vram_offered_mib=int(node.resources.get(VRAM_RESOURCE, 0)),
        labels=dict(node.labels),
        models=sorted(models),
        note=note,
        checked_at=probe.at if probe else None,
    )
    if probe is not None:
        inv = probe.inventory
        status.cpu_model, status.cpu_cores = inv.cpu_model, inv.cpu_cores
        status.load_avg = inv.load_avg
        status.ram_total, status.ram_used = inv.ram_total, inv.ram_total - inv.ram_available
        status.gpus = [
            GpuStatus(name=g.name, vram_total=g.vram_total, vram_used=g.vram_total - g.vram_free)
            for g in inv.gpus
        ]
        if status.note is None and not inv.gpus and inv.gpu_note and status.vram_offered_mib:
            status.note = inv.gpu_note
    return status


def ray_nodes() -> list[RayNode]:
    """Every node GCS knows, alive or dead (a blocking call)."""
    return [
        RayNode(
            node_id=n["NodeID"],
            alive=bool(n["Alive"]),
            address=n["NodeManagerAddress"],
            labels=dict(n.get("Labels") or {}),
            resources={k: v for k, v in (n.get("Resources") or {}).items() if "node:" not in k},
        )
        for n in ray.nodes()
    ]


_probe = ray.remote(num_cpus=0, max_retries=0)(current_inventory)


@dataclass
class InventoryMonitor:
    """Keeps the latest probe of every live node; ``refresh`` then ``snapshot``."""

    stale_after: float = 8.0
    nodes: list[RayNode] = field(default_factory=list)
    probes: dict[str, ProbeResult] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    _pending: dict[str, ray.ObjectRef] = field(default_factory=dict)

    async def refresh(self) -> None:
        """Read GCS, collect probes that answered, start probes where none is pending."""
        self.nodes = await asyncio.to_thread(ray_nodes)
        now = time.time()
        for node in self.nodes:
            self.first_seen.setdefault(node.node_id, now)
        await asyncio.to_thread(self._collect)
        for node in self.nodes:
            if node.alive and node.node_id not in self._pending:
                strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
                self._pending[node.node_id] = _probe.options(scheduling_strategy=strategy).remote()

    def _collect(self) -> None:
        refs = list(self._pending.values())
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(ready)
        for node_id, ref in list(self._pending.items()):
            if ref in done:
                del self._pending[node_id]
                try:
                    self.probes[node_id] = ProbeResult(ray.get(ref), time.time())
                except Exception:  # noqa: BLE001 - the node died mid-probe; GCS will say
                    pass
        alive = {n.node_id for n in self.nodes if n.alive}
        for node_id in list(self._pending):
            if node_id not in alive:  # its node is gone: the probe will never run
                ray.cancel(self._pending.pop(node_id), force=False)

    def snapshot(self, models: dict[str, list[str]] | None = None) -> list[NodeStatus]:
        return merge(
            self.nodes, self.probes, self.first_seen, models or {}, time.time(), self.stale_after
        )

    async def settle(self, timeout: float) -> list[NodeStatus]:
        """Refresh until every live node has answered (or ``timeout``): a one-shot view."""
        deadline = time.monotonic() + timeout
        while True:
            await self.refresh()
            waiting = [n for n in self.nodes if n.alive and n.node_id not in self.probes]
            if not waiting or time.monotonic() > deadline:
                return self.snapshot()
            await asyncio.sleep(0.2)
