"""What the controller knows of each placement's use: its replicas' load reports, when it
began to run, and the loads asked without a request. Plain bookkeeping, the clock a
parameter; the autoscaler, keep-alive, eviction, routes and views read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.autoscale import PlacementLoad
from cluster.planner import Placement
from deployments.replica import REPORT_HEARTBEAT, ReplicaLoad

# A replica's load report older than this is from a replica that is gone.
REPORT_STALE = 3 * REPORT_HEARTBEAT + 1.0


@dataclass
class LoadBook:
    """Load reports by placement (see module docstring); times are monotonic."""

    # A placement just loaded counts as used for this long: the ingress that asked for it
    # routes the request it loaded for with the routes it was told (ROUTES_TTL).
    settle: float
    # app -> replica -> (when received, what it said)
    _reports: dict[str, dict[str, tuple[float, ReplicaLoad]]] = field(default_factory=dict)
    _ready_at: dict[tuple[str, str], float] = field(default_factory=dict)
    # model -> (when, keep_alive): loads asked without a request (Ollama's empty prompt)
    _touched: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    def report(self, app: str, replica: str, load: ReplicaLoad, now: float) -> None:
        """A replica of ``app`` said ``load``."""
        self._reports.setdefault(app, {})[replica] = (now, load)

    def fresh(self, app: str, now: float) -> list[tuple[float, ReplicaLoad]]:
        """``app``'s replicas' last reports that are not stale, with when each came."""
        by_replica = self._reports.get(app, {})
        for replica, (received, _) in list(by_replica.items()):
            if now - received > REPORT_STALE:
                del by_replica[replica]
        return list(by_replica.values())

    def loads(self, app: str, now: float) -> list[ReplicaLoad]:
        return [load for _, load in self.fresh(app, now)]

    def held_by_origin(self, app: str, now: float) -> dict[str, int]:
        """Requests ``app``'s replicas hold, by the ingress that sent them."""
        held: dict[str, int] = {}
        for load in self.loads(app, now):
            for origin, n in load.pending.items():
                held[origin] = held.get(origin, 0) + n
        return held

    def ready(self, key: tuple[str, str], now: float, *, again: bool = False) -> None:
        """The placement ``key`` runs from ``now`` on (``again``: even if it ran before)."""
        if again or key not in self._ready_at:
            self._ready_at[key] = now

    def touch(self, model: str, now: float, keep_alive: float | None) -> None:
        """``model`` was loaded without a request, asking for ``keep_alive``."""
        self._touched[model] = (now, keep_alive)

    def forget(self, app: str, key: tuple[str, str], *, model_placed: bool) -> None:
        """The placement ``key`` (Serve app ``app``) is gone; ``model_placed``: its model
        still runs elsewhere (then a load asked of the model still counts)."""
        self._ready_at.pop(key, None)
        self._reports.pop(app, None)
        if not model_placed:
            self._touched.pop(key[0], None)

    def load_of(
        self, p: Placement, app: str, now: float, default_keep_alive: float
    ) -> PlacementLoad:
        """``p``'s load from its replicas' fresh reports; ``default_keep_alive``: its
        model's, for when no request asked for another."""
        reports = self.fresh(app, now)
        in_flight = sum(load.in_flight for _, load in reports)
        last_use, keep_alive = self._ready_at.get(p.key, now) + self.settle, None
        ended = [
            (received - r.idle_for, r.keep_alive)
            for received, r in reports
            if r.idle_for is not None
        ]
        if p.model in self._touched:
            ended.append(self._touched[p.model])
        if ended:
            when, keep_alive = max(ended, key=lambda e: e[0])
            last_use = max(last_use, when)
        if keep_alive is None:
            keep_alive = default_keep_alive
        idle_since = None if in_flight else last_use
        slots = max((load.slots for _, load in reports), default=1)
        return PlacementLoad(
            p.model, p.node, p.replicas, in_flight, idle_since, keep_alive, slots=slots
        )
