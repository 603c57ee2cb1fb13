"""When a placement whose model process keeps dying is given up on, and for how long.

Serve restarts a replica whose process died, and the ingress moves the request
it was serving; a model that crashes on every request (a CPU kernel that
faults, a corrupt file that loads but cannot run) would make both repeat
without end. So: ``CRASH_LIMIT`` deaths of one placement's processes within
``CRASH_WINDOW`` seconds mark it failed. A failed model gets a clear 503 at
once; it is tried again after a back-off that doubles with each failure in a
row (``backoff``), or at once when the user applies the models file again or
unloads it (``corral stop``).

Pure functions of plain data, and ``CrashBook``, the records the controller keeps;
the clock is always a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from nodes.crashes import ProcessDeath

CRASH_LIMIT = 3  # deaths of a placement's processes ...
CRASH_WINDOW = 60.0  # ... within this many seconds: it is crash-looping
BACKOFF_FIRST = 30.0  # seconds before a failed model is tried again, the first time
BACKOFF_MAX = 600.0  # ... doubling each time in a row, up to this
# A model that has served this long since it was last tried again starts afresh.
FORGIVE_AFTER = BACKOFF_MAX
# A caller's report that names no process and a crash note this close in time tell of one
# death: a process restarts slower than this, so one replica cannot die twice within it.
SAME_DEATH = 3.0


@dataclass(frozen=True, slots=True)
class Failure:
    """A model given up on: where it crashed, why, and when it is tried again."""

    model: str
    node: str
    reason: str  # for people: how often, how fast, and the last crash's signal and place
    since: float  # seconds since the epoch
    retry_at: float  # seconds since the epoch; before then requests get a 503 at once
    attempts: int  # failures in a row (a retry that fails again adds one)

    def blocks(self, now: float) -> bool:
        """Whether requests for the model are refused at ``now`` (its back-off runs)."""
        return now < self.retry_at


def recent(deaths: Iterable[ProcessDeath], now: float) -> list[ProcessDeath]:
    """The deaths within the crash window before ``now``, oldest first."""
    return sorted((d for d in deaths if now - d.at <= CRASH_WINDOW), key=lambda d: d.at)


def crash_looping(deaths: Iterable[ProcessDeath], now: float) -> bool:
    """Whether these deaths of one placement's processes make it crash-looping at ``now``."""
    return len(recent(deaths, now)) >= CRASH_LIMIT


def backoff(attempts: int) -> float:
    """Seconds before the ``attempts``-th failure in a row is tried again."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempts - 1))


def add(known: list[ProcessDeath], new: ProcessDeath) -> list[ProcessDeath]:
    """``known`` deaths with ``new`` added, or merged into the one it tells of again.

    A death may be told twice: by its crash note (the next process reads it) and by a caller
    that saw the process die (Ray does not say which process that was). The same pid, or a
    nameless report within ``SAME_DEATH`` seconds of a note, is the same death."""
    for i, old in enumerate(known):
        if _same(old, new):
            return [*known[:i], _merge(old, new), *known[i + 1 :]]
    return [*known, new]


def _same(a: ProcessDeath, b: ProcessDeath) -> bool:
    if a.pid is not None and b.pid is not None:
        return a.pid == b.pid
    return a.source != b.source and abs(a.at - b.at) <= SAME_DEATH


def _merge(a: ProcessDeath, b: ProcessDeath) -> ProcessDeath:
    """The note knows the signal and the place, the caller only that it died; the earlier
    time is the truer one."""
    told = b if b.source == "note" else a
    return ProcessDeath(a.pid or b.pid, min(a.at, b.at), told.detail, told.source)


def failure_reason(deaths: list[ProcessDeath], node: str) -> str:
    """Why a placement was given up on, for ``corral ps``, events and errors."""
    told = [d for d in deaths if d.source == "note"] or deaths
    last = told[-1].detail if told else "its process died"
    span = deaths[-1].at - deaths[0].at if len(deaths) > 1 else 0.0
    times = {1: "once", 2: "twice"}.get(len(deaths), f"{len(deaths)} times")
    within = f" in {span:.0f}s" if len(deaths) > 1 else ""
    return f"its process on {node} crashed {times}{within}; last: {last}"


def fail(previous: Failure | None, model: str, node: str, reason: str, now: float) -> Failure:
    """The record of ``model`` failing at ``now`` (``previous``: its last failure, if the
    model has not served well since)."""
    attempts = previous.attempts + 1 if previous is not None else 1
    return Failure(model, node, reason, now, now + backoff(attempts), attempts)


@dataclass
class CrashBook:
    """The controller's records of dying processes and failed models; the clock is a
    parameter (wall time, as ``ProcessDeath.at``)."""

    deaths: dict[str, list[ProcessDeath]] = field(default_factory=dict)  # by Serve app
    failed: dict[str, Failure] = field(default_factory=dict)  # by model
    retried_at: dict[str, float] = field(default_factory=dict)  # model -> when tried again

    def died(self, app: str, death: ProcessDeath, now: float) -> None:
        """A process of ``app`` died (older deaths are forgotten, one death told twice
        counts once)."""
        self.deaths[app] = add(recent(self.deaths.get(app, []), now), death)

    def reason(self, app: str, node: str, now: float, at_least: int = 0) -> str | None:
        """Why ``app`` counts as crash-looping (``at_least`` recent deaths: ``CRASH_LIMIT``
        unless given); None while it does not."""
        deaths = recent(self.deaths.get(app, []), now)
        if not deaths or len(deaths) < (at_least or CRASH_LIMIT):
            return None
        return failure_reason(deaths, node)

    def fail(self, model: str, node: str, why: str, now: float) -> Failure:
        """Give up on ``model``: requests are refused until its back-off runs out."""
        self.failed[model] = fail(self.failed.get(model), model, node, why, now)
        self.retried_at.pop(model, None)
        return self.failed[model]

    def blocking(self, model: str, now: float) -> Failure | None:
        """``model``'s failure while its back-off runs."""
        failure = self.failed.get(model)
        return failure if failure is not None and failure.blocks(now) else None

    def loaded(self, model: str, now: float) -> None:
        """``model`` loaded: if it had failed, it is on probation from ``now``."""
        if model in self.failed:
            self.retried_at[model] = now

    def due(
        self, now: float, running: Callable[[str], bool], declared: Container[str]
    ) -> list[str]:
        """Forget the failures of models that have served ``FORGIVE_AFTER`` since they were
        tried again; return the failed declared models whose back-off ran out, to try once
        more (each once per back-off: a retry that fails waits for the next)."""
        retry = []
        for name, failure in list(self.failed.items()):
            retried = self.retried_at.get(name)
            if retried is not None and running(name):
                if now - retried > FORGIVE_AFTER:
                    del self.failed[name], self.retried_at[name]
            elif name in declared and not failure.blocks(now) and retried is None:
                self.retried_at[name] = now
                retry.append(name)
        return retry

    def clear(self, model: str) -> None:
        """The user asked again (apply, stop): the model is tried at once, from the start."""
        self.failed.pop(model, None)
        self.retried_at.pop(model, None)
