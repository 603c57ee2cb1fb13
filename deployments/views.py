"""What the controller tells its readers, as typed records defined once.

The controller (``cluster/controller.py``) answers the ingress, the CLI, ``/metrics``
and the dashboard with these; ``tests/support/local_backend.py`` returns the same. They
are pydantic models: Ray pickles them between processes, FastAPI writes them as the
JSON of ``/api/cluster/*``, and the CLI reads that JSON back with ``model_validate``.
They live here, in ``deployments``, because both sides may import it (``cluster``
imports ``deployments``, never the reverse).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel


class EventKind(StrEnum):
    """What happened to a placement (the ``kind`` of an ``Event``)."""

    LOAD = "load"  # a cold start: a request (or Ollama's empty prompt) loaded a model
    EVICT = "evict"  # unloaded to make room for another model
    EXPIRE = "expire"  # keep-alive ran out
    SCALE_DOWN = "scale_down"  # the autoscaler took replicas off (low load)
    UNLOAD = "unload"  # a client asked (keep_alive 0, corral stop)
    SCALE_UP = "scale_up"  # the autoscaler added a replica (high load)
    LOST = "lost"  # its node (or a node of its split) left the cluster
    REPLACE = "replace"  # loaded elsewhere in place of a lost one
    NOT_REPLACED = "not_replaced"  # a lost one fits on no node left
    FAILED = "failed"  # given up on: its process kept crashing


class Event(BaseModel):
    """One event of the controller, with its reason: free text for people, and a
    ``category`` from a short fixed vocabulary for ``/metrics``."""

    time: float  # seconds since the epoch
    kind: EventKind
    model: str
    node: str
    reason: str
    category: str


class Part(BaseModel):
    """The layers one lending node holds of a split placement."""

    node: str
    layers: int
    ram: int  # bytes
    vram: int = 0  # bytes: the blocks on its GPUs, when it lends VRAM


class Failure(BaseModel):
    """Why a model was given up on, and when it is tried again."""

    reason: str
    since: float  # seconds since the epoch
    retry_at: float
    attempts: int


class PlacementView(BaseModel):
    """One placement (a model on a node) as ``corral ps``, ``/api/ps`` and the dashboard
    show it: what it holds, its Serve status and its load. A model given up on is a row
    with no replica, status ``FAILED`` and its ``failure``."""

    model: str
    node: str
    app: str  # its Serve application
    status: str  # Serve's (RUNNING, DEPLOYING, ...), MISSING, or FAILED
    replicas: int
    in_flight: int  # requests its replicas hold (running and queued)
    slots: int  # requests its replicas run at once
    idle_for: float | None  # seconds; None while it serves
    keep_alive: float | None  # seconds; None: forever
    expires_at: float | None  # when keep-alive unloads it (epoch seconds); None: never
    held: bool  # keep-alive unloads nothing below the declared minimum
    pinned: bool
    min: int
    max: int
    declared: bool  # by the applied models file (else loaded on demand)
    context: int | None
    threads: int | None
    gpu_layers: int | None
    ram: int  # bytes each replica holds on its node
    vram: int
    path: str | None
    reason: str  # why it is there (the planner's), or why it failed
    layers: int | None = None  # a split placement: the layers its own node keeps
    parts: list[Part] = []  # ... and those other nodes hold
    failure: Failure | None = None


class GpuStatus(BaseModel):
    name: str
    vram_total: int  # MiB
    vram_used: int


class NodeStatus(BaseModel):
    """One node: one row of ``corral nodes`` and of ``GET /api/cluster/nodes``."""

    name: str
    node_id: str
    address: str
    role: str  # head, worker, or "-" for a Ray node Corral did not start
    state: Literal["up", "down"]
    cpu_model: str | None = None
    cpu_cores: int | None = None
    load_avg: float | None = None  # the 1-minute load average its probe saw
    ram_total: int | None = None  # bytes, the box's own
    ram_used: int | None = None
    ram_offered: int = 0  # bytes Corral may use for models (Ray's "memory")
    gpus: list[GpuStatus] = []
    vram_offered_mib: int = 0
    labels: dict[str, str] = {}  # the Ray labels it started with (corral.node, corral.gpu ...)
    models: list[str] = []  # models with a replica on this node
    note: str | None = None  # why it is down, why it has no GPU, ...
    checked_at: float | None = None  # when its probe last answered (epoch seconds)
    since: float | None = None  # up: when it joined; down: when it was last heard from


class PlacementLoadView(BaseModel):
    """A placement's load, summed over its replicas' last reports (for ``/metrics``)."""

    model: str
    node: str
    replicas: int
    in_flight: int
    queued: int
    slots: int


class NodeUse(BaseModel):
    """A node's use (for ``/metrics``); the sizes are None while it is down or unprobed."""

    name: str
    up: bool
    placements: int
    replicas: int
    ram_total: int | None
    ram_used: int | None
    vram_total: int | None  # MiB, all its GPUs
    vram_used: int | None


class EventCount(BaseModel):
    """How many events of a kind a placement had since the controller started."""

    kind: EventKind
    model: str
    node: str
    reason: str  # the event's category
    count: int


class ClusterMetrics(BaseModel):
    """What ``/metrics`` shows of the cluster: only what the controller already holds
    (a scrape must stay cheap)."""

    placements: list[PlacementLoadView]
    nodes: list[NodeUse]
    events: list[EventCount]


class PlanChange(BaseModel):
    """One line of a plan: a placement added (+), removed (-) or changed (~)."""

    op: Literal["+", "-", "~"]
    model: str
    node: str
    detail: str  # what ``corral plan`` prints after the sign
    reason: str | None  # why the planner put it there (for "+")
    reload: bool  # a change its replicas must restart for
    failed: str | None = None  # applied: why it failed


class Unplaced(BaseModel):
    """A model that got fewer replicas than it asks for, and why."""

    model: str
    wanted: int
    placed: int
    reason: str


class PlanView(BaseModel):
    """A plan (or an apply) of a models file, as ``corral plan`` and the dashboard show it."""

    changes: list[PlanChange]
    unchanged: list[str]  # placements that stay as they run ("model on node")
    unplaced: list[Unplaced]
    notes: list[str]
    summary: str
