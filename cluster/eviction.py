"""Eviction: which idle placements of other models to unload so that a model fits.

Pure, like the planner: ``candidates`` lists what may go, least recently used
first; ``choose`` takes them in that order until ``fits`` (the planner, in the
controller) says the model can be placed, then puts back every one that was
not needed after all. Never evicted: a pinned model, a placement serving
requests, replicas a model needs for its ``replicas.min``, and the model being
loaded itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.autoscale import ModelState
from nodes.durations import format_duration


@dataclass(frozen=True, slots=True)
class Victim:
    """Replicas of one placement that may be unloaded."""

    model: str
    node: str
    replicas: int  # how many of the placement's replicas go
    idle_since: float

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.node

    def describe(self, now: float) -> str:
        many = f"{self.replicas} replicas of " if self.replicas != 1 else ""
        return (
            f"{many}{self.model} on {self.node} (idle for {format_duration(now - self.idle_since)})"
        )


def candidates(models: Sequence[ModelState], loading: str) -> list[Victim]:
    """What may be evicted to make room for ``loading``, least recently used first."""
    found: list[Victim] = []
    for state in models:
        spec = state.spec
        if spec.name == loading or spec.pinned:
            continue
        spare = state.replicas - spec.replicas.min
        idle = [p for p in state.placements if p.in_flight == 0 and p.idle_since is not None]
        for p in sorted(idle, key=lambda p: (p.idle_since, p.node)):
            if spare <= 0:
                break
            n = min(p.replicas, spare)
            assert p.idle_since is not None
            found.append(Victim(p.model, p.node, n, p.idle_since))
            spare -= n
    return sorted(found, key=lambda v: (v.idle_since, v.model, v.node))


def choose(
    ordered: Sequence[Victim], fits: Callable[[Sequence[Victim]], bool]
) -> list[Victim] | None:
    """The fewest of ``ordered`` (taken in order) after whose eviction ``fits``; [] if it
    fits already, None if even evicting them all is not enough."""
    if fits([]):
        return []
    chosen: list[Victim] = []
    for victim in ordered:
        chosen.append(victim)
        if fits(chosen):
            break
    else:
        return None
    # An early victim may not have helped (its node could not take the model anyway):
    # keep it loaded. The most recently used are tried first.
    for victim in reversed(chosen[:-1]):
        trial = [v for v in chosen if v is not victim]
        if fits(trial):
            chosen = trial
    return chosen
