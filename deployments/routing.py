"""Which placement of a model gets the next request: pure choices over plain data.

The ingress knows exactly how many requests it has in flight on each
placement; replicas report what they hold by origin (which ingress sent it),
so requests from other ingresses count too without counting this one's twice.
``least_loaded`` picks the placement with the fewest requests per replica,
ties at random; a slow node finishes its requests later, holds more of them,
and so gets fewer new ones. A placement at its queue limit gets none: when all
are full the caller answers 429 instead of queueing without bound.

``round_robin`` and ``random`` exist to compare against (``bench/routing.py``).

A conversation's next turn is cheapest where its earlier turns are cached (a
replica's slots keep what they read). ``with_affinity`` sends a request to the
placement that served its conversation last, unless that one is busier than
the least-loaded choice by more than ``AFFINITY_SLACK`` requests per replica: a
bounded-load rule (like consistent hashing with bounded loads), so a popular
conversation cannot pile onto one box while others idle. ``conversation_of``
and ``follows`` say which conversation a request belongs to and whether it has
earlier turns worth going back for.

``choose`` is the whole routing choice (strategy, then affinity): the one
function a new rule (such as routing by the longest cached prefix) extends.
The state it needs (loads, the last holder of a conversation) is kept by the
ingress's placement router, ``deployments/placement_router.py``.
"""

from __future__ import annotations

import hashlib
import random as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from nodes.engine import GenerateRequest
from nodes.models import normalize_name

Strategy = Literal["least_loaded", "round_robin", "random"]
STRATEGIES: tuple[Strategy, ...] = ("least_loaded", "round_robin", "random")


@dataclass(frozen=True, slots=True)
class Route:
    """One placement of a model as the controller tells the ingress about it."""

    app: str  # the Serve application
    node: str
    replicas: int
    capacity: int  # requests its replicas hold at most (running + queued)
    # requests its replicas hold now, by the origin (ingress) that sent them
    reported: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A route with the load the ingress sees on it now."""

    app: str
    replicas: int
    load: int  # requests in flight and queued on its replicas
    capacity: int

    @property
    def full(self) -> bool:
        return self.load >= self.capacity


def merge_load(route: Route, local: int, origin: str) -> Candidate:
    """``route`` with this ingress's exact count plus what the replicas hold for others."""
    others = sum(n for who, n in route.reported.items() if who != origin)
    return Candidate(route.app, route.replicas, local + others, route.capacity)


def conversation_key(model: str, turns: Sequence[str]) -> str:
    """What names a request's conversation for affinity: its model and how it starts
    (the caller passes what every later turn repeats: the system prompt and the first
    user message)."""
    digest = hashlib.blake2b(digest_size=12)
    for part in (model, *turns):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def conversation_of(model: str, request: GenerateRequest) -> str:
    """The affinity key of ``request``: its model and how its conversation starts."""
    if request.messages is not None:  # up to the first user turn: what every turn repeats
        turns = []
        for m in request.messages:
            turns.append(f"{m.role}\x00{m.content}")
            if m.role == "user":
                break
        turns = ["\x00".join(turns)]
    else:
        turns = [request.prompt or ""]
    return conversation_key(normalize_name(model), turns)


def follows(request: GenerateRequest) -> bool:
    """Whether ``request`` continues a conversation: a message after its first user turn
    (the earlier answer and what came since are what a placement may hold cached)."""
    messages = request.messages or ()
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    return first_user < len(messages) - 1


AFFINITY_SLACK = 2  # requests per replica a cached prefix is worth waiting behind


def per_replica(c: Candidate) -> Fraction:
    return Fraction(c.load, max(1, c.replicas))


def with_affinity(
    candidates: Sequence[Candidate],
    chosen: Candidate | None,
    holder: str | None,
    slack: int = AFFINITY_SLACK,
) -> Candidate | None:
    """``holder`` (the app that holds the request's prefix) instead of ``chosen`` when it
    is open and at most ``slack`` requests per replica busier; else ``chosen``."""
    if chosen is None or holder is None or holder == chosen.app:
        return chosen
    held = next((c for c in candidates if c.app == holder and not c.full), None)
    if held is not None and per_replica(held) <= per_replica(chosen) + slack:
        return held
    return chosen


def least_loaded(candidates: Sequence[Candidate], rng: _random.Random) -> Candidate | None:
    """The open candidate with the fewest requests per replica (ties at random), or
    None when every one is full."""
    open_ = [c for c in candidates if not c.full]
    if not open_:
        return None
    loads = {c.app: per_replica(c) for c in open_}
    best = min(loads.values())
    return rng.choice([c for c in open_ if loads[c.app] == best])


class Router:
    """Picks a candidate by ``strategy``; holds the round-robin position."""

    def __init__(self, strategy: Strategy = "least_loaded", seed: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; one of {STRATEGIES}")
        self.strategy = strategy
        self._rng = _random.Random(seed)
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate]) -> Candidate | None:
        if self.strategy == "least_loaded":
            return least_loaded(candidates, self._rng)
        open_ = sorted((c for c in candidates if not c.full), key=lambda c: c.app)
        if not open_:
            return None
        if self.strategy == "random":
            return self._rng.choice(open_)
        self._turn += 1
        return open_[self._turn % len(open_)]


def choose(
    router: Router, candidates: Sequence[Candidate], holder: str | None = None
) -> Candidate | None:
    """The routing choice: ``router``'s pick among ``candidates``, then the bounded
    preference for ``holder``, the placement that holds the request's prefix (None: the
    request has no earlier turn worth going back for). None when every one is full."""
    return with_affinity(candidates, router.choose(candidates), holder)


def retry_after(candidates: Sequence[Candidate], seconds_per_request: float) -> float:
    """A fair Retry-After when every candidate is full: the time for one queue slot to
    free, at least a second."""
    replicas = sum(c.replicas for c in candidates) or 1
    return max(1.0, seconds_per_request / replicas)
