"""The controller's answers to its readers, built from what it holds: pure functions from
its records (placements, loads, Serve states, failures, the inventory) to the typed
views of ``deployments/views.py``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from cluster import crashloop
from cluster.autoscale import PlacementLoad
from cluster.planner import Placement
from cluster.serve_apps import AppState, app_name_for
from cluster.spec import ModelSpec
from deployments.replica import ReplicaLoad
from deployments.views import (
    EventCount,
    EventKind,
    Failure,
    NodeStatus,
    NodeUse,
    Part,
    PlacementLoadView,
    PlacementView,
)
from nodes.durations import FOREVER


def placement_view(
    p: Placement,
    state: AppState | None,
    load: PlacementLoad,
    spec: ModelSpec,
    *,
    total: int,
    declared: bool,
    now: float,
    wall: float,
) -> PlacementView:
    """``p`` with its Serve ``state`` and ``load``; ``total``: the replicas of its model
    on every node; ``now`` (monotonic) and ``wall`` (epoch): the same instant."""
    held = total <= spec.replicas.min  # keep-alive unloads nothing below min
    expires = None if held else load.expires_at
    return PlacementView(
        model=p.model,
        node=p.node,
        app=app_name_for(*p.key),
        status=state.status if state else "MISSING",
        replicas=p.replicas,
        in_flight=load.in_flight,
        slots=load.slots * p.replicas,
        idle_for=None if load.idle_since is None else max(0.0, now - load.idle_since),
        keep_alive=None if load.keep_alive == FOREVER else load.keep_alive,
        expires_at=None if expires is None else wall + (expires - now),
        held=held,
        pinned=spec.pinned,
        min=spec.replicas.min,
        max=spec.replicas.max,
        declared=declared,
        context=p.context,
        threads=p.threads,
        gpu_layers=p.gpu_layers,
        ram=p.ram,
        vram=p.vram,
        path=p.path,
        reason=p.reason,
        layers=p.held if p.parts else None,
        parts=[Part(node=q.node, layers=q.layers, ram=q.ram, vram=q.vram) for q in p.parts],
    )


def failed_view(f: crashloop.Failure, spec: ModelSpec, *, declared: bool) -> PlacementView:
    """A model given up on, as a placement row: no replica, and why."""
    return PlacementView(
        model=f.model,
        node=f.node,
        app=app_name_for(f.model, f.node),
        status="FAILED",
        replicas=0,
        in_flight=0,
        slots=0,
        idle_for=None,
        keep_alive=None,
        expires_at=None,
        held=False,
        pinned=spec.pinned,
        min=spec.replicas.min,
        max=spec.replicas.max,
        declared=declared,
        context=None,
        threads=None,
        gpu_layers=None,
        ram=0,
        vram=0,
        path=None,
        reason=f.reason,
        failure=Failure(reason=f.reason, since=f.since, retry_at=f.retry_at, attempts=f.attempts),
    )


def placement_load(p: Placement, loads: Sequence[ReplicaLoad]) -> PlacementLoadView:
    """``p``'s load from its replicas' fresh reports."""
    return PlacementLoadView(
        model=p.model,
        node=p.node,
        replicas=p.replicas,
        in_flight=sum(load.in_flight for load in loads),
        queued=sum(load.queued for load in loads),
        slots=sum(load.slots for load in loads),
    )


def node_uses(statuses: Iterable[NodeStatus], placements: Sequence[Placement]) -> list[NodeUse]:
    """Each node's use; a box that rejoined and left again keeps its first row."""
    uses, seen = [], set()
    for s in statuses:
        if s.name in seen:
            continue
        seen.add(s.name)
        mine = [p for p in placements if p.node == s.name]
        up, probed = s.state == "up", s.ram_total is not None
        gpus = up and probed
        uses.append(
            NodeUse(
                name=s.name,
                up=up,
                placements=len(mine),
                replicas=sum(p.replicas for p in mine),
                ram_total=s.ram_total if up else None,
                ram_used=s.ram_used if up else None,
                vram_total=sum(g.vram_total for g in s.gpus) if gpus else None,
                vram_used=sum(g.vram_used for g in s.gpus) if gpus else None,
            )
        )
    return uses


def event_counts(counts: Counter[tuple[EventKind, str, str, str]]) -> list[EventCount]:
    """The events since the controller started, counted by kind, placement and category."""
    return [
        EventCount(kind=kind, model=model, node=node, reason=category, count=n)
        for (kind, model, node, category), n in sorted(counts.items())
    ]
