"""Autoscaling and keep-alive: a pure function of a load snapshot and the time.

``decide(models, now)`` looks at each model's placements (replicas, requests in
flight, idle since when, keep-alive) and returns at most one decision per model
with its reason, plus the timers to hand back next time:

* **keep-alive** (Ollama's meaning): a placement idle for its keep-alive (the
  last request's ``keep_alive``, else the model's) is removed, down to the
  model's ``replicas.min``; ``0`` unloads right after a request, an infinite
  keep-alive never;
* **scale up**: in-flight requests per slot (a replica runs ``parallel``
  requests at once) above ``autoscaling.target`` for ``upscale_delay`` adds one
  replica (the planner picks where), up to ``replicas.max``;
* **scale down**: fewer requests than the remaining replicas could take at the
  target, for ``downscale_delay``, removes one replica, preferring the idlest
  placement, never below ``max(replicas.min, 1)`` (the last replica goes by
  keep-alive, not by load).

No clock and no Ray here: the controller passes the time and applies the
decisions (``cluster/controller.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cluster.spec import ModelSpec
from nodes.durations import FOREVER, format_duration


@dataclass(frozen=True, slots=True)
class PlacementLoad:
    """A placement (a model on a node) with its load at the snapshot's time."""

    model: str
    node: str
    replicas: int
    in_flight: int  # requests running or queued on its replicas
    idle_since: float | None  # when its last request ended (or it loaded); None while busy
    keep_alive: float = FOREVER  # seconds it may stay idle; FOREVER: no expiry
    slots: int = 1  # requests each of its replicas runs at once

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.node

    @property
    def expires_at(self) -> float | None:
        """When keep-alive removes it if no request comes; None while busy or kept forever."""
        if self.idle_since is None or self.keep_alive == FOREVER:
            return None
        return self.idle_since + self.keep_alive


@dataclass(frozen=True, slots=True)
class Timers:
    """Since when a model's load has been above (or below) what its replicas should carry."""

    above_since: float | None = None
    below_since: float | None = None


@dataclass(frozen=True, slots=True)
class ModelState:
    spec: ModelSpec
    placements: tuple[PlacementLoad, ...]
    timers: Timers = Timers()

    @property
    def replicas(self) -> int:
        return sum(p.replicas for p in self.placements)

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self.placements)

    @property
    def slots(self) -> int:
        """Requests one replica runs at once (the same on every placement of a model)."""
        return max((p.slots for p in self.placements), default=1)


@dataclass(frozen=True, slots=True)
class Decision:
    """One change to a model's replicas, and why."""

    op: Literal["scale_up", "scale_down", "expire"]
    model: str
    node: str | None  # the placement to shrink or remove; None: the planner picks
    replicas: int  # the model's replicas once done
    reason: str

    def describe(self) -> str:
        where = f" on {self.node}" if self.node else ""
        return f"{self.op.replace('_', ' ')} {self.model}{where} to {self.replicas}: {self.reason}"


def decide(models: Sequence[ModelState], now: float) -> tuple[list[Decision], dict[str, Timers]]:
    """The decisions for ``models`` at time ``now``, and each model's timers for next time."""
    decisions: list[Decision] = []
    timers: dict[str, Timers] = {}
    for state in models:
        decision, timers[state.spec.name] = _decide_one(state, now)
        if decision is not None:
            decisions.append(decision)
    return decisions, timers


def _decide_one(state: ModelState, now: float) -> tuple[Decision | None, Timers]:
    spec, total, in_flight = state.spec, state.replicas, state.in_flight
    if total == 0:
        return None, Timers()
    expired = _expired(state, now)
    if expired is not None:
        return expired, Timers()
    scaling = spec.autoscaling
    target = scaling.target * state.slots  # per replica
    per_replica = in_flight / total
    above = None
    if per_replica > target and total < spec.replicas.max:
        above = state.timers.above_since if state.timers.above_since is not None else now
        if now - above >= scaling.upscale_delay:
            reason = (
                f"{in_flight} requests in flight on {_replicas(total)} for "
                f"{format_duration(now - above)} (target {target:g} per replica)"
            )
            return Decision("scale_up", spec.name, None, total + 1, reason), Timers()
    enough = max(spec.replicas.min, 1, math.ceil(in_flight / target))
    below = None
    if total > enough:
        below = state.timers.below_since if state.timers.below_since is not None else now
        if now - below >= scaling.downscale_delay:
            idlest = min(state.placements, key=_idleness)
            reason = (
                f"{in_flight} requests in flight on {_replicas(total)} for "
                f"{format_duration(now - below)}; {enough} carry them at the target "
                f"{target:g} per replica"
            )
            return Decision("scale_down", spec.name, idlest.node, total - 1, reason), Timers()
    return None, Timers(above, below)


def _expired(state: ModelState, now: float) -> Decision | None:
    """Keep-alive: the placement that expired first, removed down to the model's min."""
    spare = state.replicas - state.spec.replicas.min
    due = [p for p in state.placements if p.expires_at is not None and p.expires_at <= now]
    if spare <= 0 or not due:
        return None
    p = min(due, key=lambda p: (p.expires_at, p.node))
    assert p.idle_since is not None
    removed = min(p.replicas, spare)
    idle = format_duration(now - p.idle_since)
    reason = f"idle for {idle} (keep_alive {format_duration(p.keep_alive)})"
    return Decision("expire", state.spec.name, p.node, state.replicas - removed, reason)


def _idleness(p: PlacementLoad) -> tuple:
    """Sort key: idle placements first, the longest idle first; then the least busy."""
    busy = p.idle_since is None
    return busy, p.in_flight, p.idle_since if p.idle_since is not None else 0.0, p.node


def _replicas(n: int) -> str:
    return f"{n} replica{'s' if n != 1 else ''}"
