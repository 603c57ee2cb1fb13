"""The controller: one named Ray actor that decides what runs where.

Its desired state is the ``models.yaml`` last applied plus the models loaded on
demand. ``plan`` shows what applying a file would change; ``apply`` makes it
so: the planner (``cluster/planner.py``) picks placements, and each placement
becomes one Serve application, its replicas pinned to their node by label and
holding their RAM (Ray's ``memory``) and VRAM (``vram_mib``) so that Ray itself
refuses to overfill a box. ``ensure`` serves a request for a model with no
replica: it plans one placement for it and loads it, and many requests for a
cold model share one load.

Changes run removals first (their memory is needed by what comes next), then
replica-count changes (through Serve's external-scaler API, which leaves the
running replicas alone; deploying again would restart them all), then new and
reloaded placements, all of them at once, each waited for until it runs or
fails.

Faults. A node that leaves the cluster takes its placements with it: the
controller drops them from the routes at its next tick, and places what they
ran where it fits (a ``lost`` event, then ``replace``; or ``not_replaced`` with
the planner's reason, retried when a node joins). What the controller alone
knows is saved to the state directory after every change (``cluster/state.py``);
a controller that starts, or that Ray restarts after a crash, reads it back,
adopts the Serve applications that still run (their replicas keep their loaded
models) and applies the saved models file again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import ray

from cluster import crashloop, eviction, lenders
from cluster.autoscale import Decision, ModelState, PlacementLoad, Timers, decide
from cluster.catalog import Catalog
from cluster.inventory import InventoryMonitor
from cluster.library import Library
from cluster.loads import LoadBook
from cluster.plan_report import PlanReport, label, report_view
from cluster.planner import Change, Placement, Plan, PlanNode, diff, plan
from cluster.route_leases import RouteLeases
from cluster.serve_apps import (
    Loading,
    RayServeApps,
    ServeApps,
    actor_options,
    adoptable,
    app_name_for,
    wait_running,
)
from cluster.settings import CorralSettings
from cluster.spec import ModelSpec, Replicas, dump_models, parse_models
from cluster.state import STATE_FILE, SavedState, load_state, save_state
from cluster.views import event_counts, failed_view, node_uses, placement_load, placement_view
from cluster.yamlfile import ConfigError
from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
from deployments.placement_router import ROUTES_TTL
from deployments.replica import ReplicaLoad, ReplicaOptions, replica_app
from deployments.routing import Route
from deployments.views import (
    ClusterMetrics,
    Event,
    EventKind,
    NodeStatus,
    PlacementView,
    PlanView,
)
from nodes.agent import LABEL_NODE
from nodes.crashes import ProcessDeath
from nodes.engine import EngineSpec, RpcPart
from nodes.errors import (
    CorralError,
    InvalidRequest,
    ModelFailed,
    ModelLoadFailed,
    ServiceUnavailable,
)
from nodes.gguf import GgufInfo, read_gguf
from nodes.logs import setup_logging
from nodes.models import LocalModel, normalize_name

log = logging.getLogger("corral.controller")

TICK_SECONDS = 2.0  # how often the controller refreshes its view of the cluster
EVENTS_KEPT = 500
MODELS_FILE_NAME = "models.yaml"  # what errors call a models file sent as text
# How often placements lost with a node that fit nowhere are tried again (also whenever a
# node joins).
REPLACE_RETRY = 30.0
# The reason category /metrics counts each autoscaler decision by (a short, fixed vocabulary;
# the event's free text says more).
DECISION_CATEGORY = {"scale_up": "high_load", "scale_down": "low_load", "expire": "keep_alive"}
MIB = 1024**2


class Controller:
    """Owns the model catalog and the placements (see module docstring)."""

    def __init__(self, settings: CorralSettings, serve_apps: ServeApps | None = None) -> None:
        setup_logging(settings.log_level)
        self._settings = settings
        self._serve = serve_apps or RayServeApps()
        self._catalog = Catalog(Library(settings.models_path))  # which file each model runs
        self._declared: dict[str, ModelSpec] = {}  # the last applied models file
        self._on_demand: set[str] = set()  # models loaded by a request, not declared
        self._placements: dict[tuple[str, str], Placement] = {}  # what runs
        self._loads = LoadBook(settle=ROUTES_TTL)  # load reports, when each began to run
        self._timers: dict[str, Timers] = {}  # the autoscaler's, by model
        # Whether RPC workers may run (a split started since the last sweep found none, or
        # a controller before this one may have left some): the ticks then sweep them.
        self._lent = True
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        # (kind, model, node, category) -> events since the controller started, for /metrics
        self._event_counts: Counter[tuple[EventKind, str, str, str]] = Counter()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._changing = asyncio.Lock()  # one change of placements at a time
        self._leases = RouteLeases(ROUTES_TTL)  # which ingress may still use which routes
        self._inventory = InventoryMonitor()
        self._tasks: list[asyncio.Task[None]] = []
        # Placements lost with their node and not yet placed elsewhere, by (model, node).
        self._lost: dict[tuple[str, str], Placement] = {}
        self._alive: set[str] | None = None  # node names alive when last reconciled
        # Split placements whose RPC worker was missing at the last tick while its node
        # still looked alive: a box that is unplugged loses its actors a moment before Ray
        # calls the box dead, so the loss is named at the next tick, when Ray knows which.
        self._lender_missing: set[tuple[str, str]] = set()
        self._replace_tried = 0.0  # when lost placements were last tried elsewhere
        self._not_replaced: dict[str, str] = {}  # model -> why its lost replicas fit nowhere
        self._state_file = settings.state_path / STATE_FILE
        self._saved: SavedState | None = None  # what the state file holds
        self._recovered = asyncio.Event()  # set once the saved state is read back
        self._crashes = crashloop.CrashBook()  # dying processes, failed models
        self._background: set[asyncio.Task] = set()  # take-downs and retries under way
        self._starting: set[str] = set()  # the apps being deployed and waited for
        self._deployed_at: dict[str, float] = {}  # app -> when it was last deployed (wall)

    async def ping(self) -> bool:
        """Answers once the controller runs and has read back its saved state."""
        await self._started()
        return True

    def _start(self) -> None:
        """Start the recovery and the periodic work, once. Any call may be the first: after
        a crash Ray restarts the actor, and then nobody calls ``ping``."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._recover()),
                asyncio.create_task(self._every(TICK_SECONDS, self._tick)),
                asyncio.create_task(self._every(self._settings.policy_interval, self._police)),
            ]

    async def _started(self) -> None:
        """Wait until the saved state is back: before then the catalog is incomplete."""
        self._start()
        await self._recovered.wait()

    async def _every(self, seconds: float, work) -> None:
        while True:
            try:
                await work()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the controller
                log.exception("controller tick failed")
            await asyncio.sleep(seconds)

    # -- load reports, autoscaling and keep-alive --------------------------------

    async def report(self, app: str, replica: str, load: ReplicaLoad) -> None:
        """A replica's load (``deployments/replica.py`` sends it when it changes)."""
        self._start()
        self._loads.report(app, replica, load, time.monotonic())

    def _load_of(self, p: Placement, now: float) -> PlacementLoad:
        """``p``'s load from its replicas' fresh reports, in this controller's clock."""
        keep_alive = self._spec_of(p.model).keep_alive
        return self._loads.load_of(p, app_name_for(*p.key), now, keep_alive)

    def _model_states(self, now: float) -> list[ModelState]:
        by_model: dict[str, list[PlacementLoad]] = {}
        for p in self._placements.values():
            by_model.setdefault(p.model, []).append(self._load_of(p, now))
        return [
            ModelState(self._spec_of(model), tuple(loads), self._timers.get(model, Timers()))
            for model, loads in sorted(by_model.items())
        ]

    def _spec_of(self, model: str) -> ModelSpec:
        return self._declared.get(model) or _demand_spec(model)

    async def _police(self) -> None:
        """One run of the autoscaling and keep-alive policy; skipped while placements change
        (a load or an apply), so that it never queues behind them."""
        if self._changing.locked():
            return
        now = time.monotonic()
        decisions, self._timers = decide(self._model_states(now), now)
        if not decisions:
            return
        async with self._changing:
            for d in decisions:
                try:
                    await self._carry_out(d)
                except Exception:  # noqa: BLE001 - the others still run
                    log.exception("%s failed", d.describe())

    async def _carry_out(self, d: Decision) -> None:
        if d.op == "scale_up":
            await self._scale_up(d)
            return
        p = self._placements.get((d.model, d.node or ""))
        if p is None:
            return
        total = sum(q.replicas for q in self._placements.values() if q.model == d.model)
        gone = await self._unload([(p, total - d.replicas)], d.reason)
        if gone:
            self._event(EventKind(d.op), d.model, p.node, d.reason, DECISION_CATEGORY[d.op])

    async def _scale_up(self, d: Decision) -> None:
        spec = self._spec_of(d.model)
        more = spec.model_copy(update={"replicas": Replicas(min=d.replicas, max=d.replicas)})
        others = [s for s in self._wanted(list(self._declared.values())) if s.name != d.model]
        report = await self._plan([*others, more])
        changes = [c for c in report.changes if c.placement.model == d.model and c.op != "-"]
        if not changes:
            missing = next((u for u in report.plan.unplaced if u.model == d.model), None)
            why = missing.reason if missing else "no node can take another replica"
            log.info("scale up %s: no room for another replica: %s", d.model, why)
            return
        failed = await self._execute(changes)
        for c in changes:
            if label(c.placement) not in failed:
                self._event(
                    EventKind.SCALE_UP, d.model, c.placement.node, d.reason, DECISION_CATEGORY[d.op]
                )

    async def _unload(
        self, cuts: Sequence[tuple[Placement, int]], reason: str, *, asked: bool = False
    ) -> list[Placement]:
        """Take ``n`` replicas off each placement that is still idle once no ingress routes to
        it any more; returns the placements it cut. A placement cut to zero is deleted.
        ``asked``: a client asked for it, so only requests in flight keep a placement."""
        decided = time.monotonic()
        whole = [p for p, n in cuts if n >= p.replicas]
        for p in whole:  # out of the routes first
            self._placements.pop(p.key, None)
        await self._drain(whole, decided)
        done = []
        for p, n in cuts:
            load = self._load_of(p, time.monotonic())
            used = load.in_flight or (not asked and (load.idle_since or 0) > decided)
            if p in whole and used:  # a request came meanwhile: it stays
                self._placements[p.key] = p
                log.info("kept %s on %s: it got a request while being unloaded", *p.key)
                continue
            app = app_name_for(*p.key)
            if p in whole:
                await self._serve.delete([app])
                self._forget(p.key)
            else:
                await self._serve.scale(app, p.replicas - n)
                self._placements[p.key] = replace(p, replicas=p.replicas - n)
            log.info("unloaded %d of %s on %s: %s", n, p.model, p.node, reason)
            done.append(p)
        await self._save()
        return done

    async def _drain(self, removed: Sequence[Placement], when: float) -> None:
        """Wait until no ingress routes to the placements taken out of the routes at
        ``when``: each has asked for new routes since, or its copy expired (see
        ``cluster/route_leases.py``). Usually no wait at all: what is removed is idle."""
        until = max((self._leases.drained_at(p.model, when) for p in removed), default=when)
        if until > time.monotonic():
            await asyncio.sleep(until - time.monotonic())

    def _drop_lost(self, model: str) -> None:
        for key in [k for k in self._lost if k[0] == model]:
            del self._lost[key]
        self._not_replaced.pop(model, None)

    def _forget(self, key: tuple[str, str]) -> None:
        placed = any(model == key[0] for model, _ in self._placements)
        self._loads.forget(app_name_for(*key), key, model_placed=placed)
        self._crashes.deaths.pop(app_name_for(*key), None)

    def _event(self, kind: EventKind, model: str, node: str, reason: str, category: str) -> None:
        """Record (and log) a cold start, eviction, scale or unload with its reason: free text
        for people, and a ``category`` from a short fixed vocabulary for /metrics."""
        log.info("%s: %s on %s: %s", kind, model, node, reason)
        self._events.append(
            Event(
                time=time.time(),
                kind=kind,
                model=model,
                node=node,
                reason=reason,
                category=category,
            )
        )
        self._event_counts[kind, model, node, category] += 1

    async def events(self, since: float = 0.0) -> list[Event]:
        """Recent cold starts, evictions, scalings and unloads, oldest first."""
        return [e for e in self._events if e.time >= since]

    # -- faults: model processes that keep crashing (cluster/crashloop.py) ----------

    async def replica_died(self, app: str, death: ProcessDeath) -> None:
        """A process of placement ``app`` died: its successor read its crash note, or a caller
        saw it die. Enough deaths in a row mark the placement failed (see crashloop)."""
        self._start()
        key = next((k for k in self._placements if app_name_for(*k) == app), None)
        loading = key is None and app in self._starting
        if key is None and not loading:
            return  # a placement already removed: its last words change nothing
        if death.at < self._deployed_at.get(app, 0.0):
            return  # a note left by a process of an earlier deployment of the same placement
        self._crashes.died(app, death, time.time())
        log.warning("a process of %s died (pid %s): %s", app, death.pid, death.detail)
        if key is not None and key[0] not in self._crashes.failed:
            why = self._crashes.reason(app, key[1], time.time())
            if why is not None:
                self._give_up(key, why)

    def _give_up(self, key: tuple[str, str], why: str) -> None:
        """Mark ``key``'s model failed at once (requests get a 503 from now on), then take its
        placement down in the background, under the change lock."""
        model, node = key
        self._crashes.fail(model, node, why, time.time())
        self._event(EventKind.FAILED, model, node, why, "crash_loop")
        self._in_background(self._take_down(key))

    def _in_background(self, work) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_quietly)

    async def _take_down(self, key: tuple[str, str]) -> None:
        async with self._changing:
            p = self._placements.pop(key, None)
            self._forget(key)
            if p is not None:  # nothing to drain: its replicas crash on every request
                await self._serve.delete([app_name_for(*key)], drain=False)
        await self._save()

    def _refuse_if_failed(self, name: str) -> None:
        """ModelFailed for a model given up on whose back-off still runs."""
        failure = self._crashes.blocking(name, time.time())
        if failure is None or self._apps_of(name):
            return
        left = failure.retry_at - time.time()
        raise ModelFailed(
            f"The model '{name}' is failed: {failure.reason}. It is tried again in "
            f"{left:.0f}s, or at once after `corral apply` or `corral stop {name}`; "
            f"`corral ps` shows it.",
            retry_after=left,
        )

    def _forgive(self) -> None:
        """Forget the failures of models that have served well since they were retried, and
        retry the failed declared models whose back-off ran out."""
        running = lambda name: bool(self._apps_of(name))  # noqa: E731
        for name in self._crashes.due(time.time(), running, self._declared):
            self._in_background(self.ensure(name, cause="retry"))

    # -- faults: the saved state, nodes that leave -------------------------------

    async def _recover(self) -> None:
        """Read back the saved state: adopt the placements whose Serve applications still
        run, remove the ones nobody knows, and apply the saved models file again."""
        saved = None
        try:
            async with self._changing:
                saved = await asyncio.to_thread(load_state, self._state_file)
                if saved is not None:
                    await self._restore(saved)
        except Exception:  # noqa: BLE001 - serve what could be restored rather than nothing
            log.exception("restoring the saved state failed; starting from what was restored")
        finally:
            self._recovered.set()
        if saved is not None:
            await self._reapply()
        await self._save()

    async def _restore(self, saved: SavedState) -> None:
        apps = {name: a.status for name, a in (await self._serve.states()).items()}
        adopted, orphans = adoptable(saved.placements, apps)
        now = time.monotonic()
        for p in adopted:
            self._placements[p.key] = p
            self._loads.ready(p.key, now, again=True)
            # Serve's count may lag ours if the last controller stopped mid-change.
            await self._serve.scale(app_name_for(*p.key), p.replicas)
        if orphans:
            log.info("removing %s: left running by a controller that stopped mid-change", orphans)
            await self._serve.delete(orphans)
        declared, files = [], {}
        for spec in saved.declared:
            try:
                files[spec.name] = await asyncio.to_thread(self._catalog.resolve, spec)
                declared.append(spec)
            except CorralError as exc:
                log.warning("the saved models file declares %s, which is gone: %s", spec.name, exc)
        self._declared = {s.name: s for s in declared}
        self._catalog.declare(files)
        wanted = {s.name for s in declared} | {p.model for p in adopted}
        self._on_demand = {m for m in saved.on_demand if m in wanted and m not in self._declared}
        self._lost = {p.key: p for p in saved.lost if p.model in self._wanted_names()}
        self._saved = saved
        log.info(
            "recovered the state saved %s: %d declared models, %d placements adopted%s",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved.saved_at)),
            len(self._declared),
            len(adopted),
            f" ({', '.join(label(p) for p in adopted)})" if adopted else "",
        )

    async def _reapply(self) -> None:
        """Make the placements what the recovered models file asks for (what was adopted
        stays as it runs), as ``corral apply`` of the same file would."""
        try:
            async with self._changing:
                report = await self._plan(self._wanted(list(self._declared.values())))
                failed = await self._execute(report.changes)
            for change in report.changes:
                why = failed.get(label(change.placement))
                log.info("recover: %s%s", change.describe(), f" FAILED: {why}" if why else "")
        except Exception:  # noqa: BLE001 - the next apply or request tries again
            log.exception("applying the recovered models file failed")

    async def _save(self) -> None:
        """Write the state to disk if it changed since the last write (never before the
        saved state was read back: that would overwrite it with nothing)."""
        if not self._recovered.is_set():
            return
        state = SavedState(
            declared=tuple(self._declared.values()),
            on_demand=tuple(sorted(self._on_demand)),
            placements=tuple(sorted(self._placements.values(), key=lambda p: p.key)),
            lost=tuple(sorted(self._lost.values(), key=lambda p: p.key)),
            saved_at=time.time(),
        )
        if state == self._saved:
            return
        try:
            await asyncio.to_thread(save_state, self._state_file, state)
            self._saved = state
        except OSError as exc:
            log.error("cannot save the controller's state to %s: %s", self._state_file, exc)

    async def _tick(self) -> None:
        await self._inventory.refresh()
        self._leases.forget_expired(time.monotonic())
        self._forgive()
        if self._recovered.is_set() and not self._changing.locked():
            await self._reconcile()
        if self._lent and self._recovered.is_set() and not self._changing.locked():
            await self._sweep_lenders()

    async def _reconcile(self) -> None:
        """Drop the placements of nodes that left the cluster (or, split over nodes, lost
        one of them or its RPC worker) and place what they ran elsewhere; try again, for
        what fit nowhere, when a node joins."""
        alive = self._alive_nodes()
        if not alive:  # no view of the cluster (this node is alive, or we would not run)
            return
        why: dict[tuple[str, str], str] = {}
        for p in self._placements.values():
            down = [node for node in p.nodes if node not in alive]
            if down:
                why[p.key] = f"{down[0]} left the cluster"
        missing = await self._without_lenders()
        for key, node in missing.items():
            if key not in why and key not in self._lender_missing:
                continue  # seen first now, with its box alive: wait one tick (see __init__)
            why.setdefault(key, f"its RPC worker on {node} stopped")
        self._lender_missing = {key for key in missing if key not in why}
        gone = [self._placements[key] for key in why if key in self._placements]
        joined = self._alive is not None and bool(alive - self._alive)
        due = time.monotonic() - self._replace_tried > REPLACE_RETRY
        if not gone and not (self._lost and (joined or due)):
            self._alive = alive
            return
        async with self._changing:
            self._alive = alive
            self._replace_tried = time.monotonic()
            for p in gone:
                self._placements.pop(p.key, None)
                self._forget(p.key)
                earlier = self._lost[p.key].replicas if p.key in self._lost else 0
                self._lost[p.key] = replace(p, replicas=p.replicas + earlier)
                self._event(EventKind.LOST, p.model, p.node, why[p.key], "node_lost")
            if gone:  # nothing to drain: their replicas died with the node
                apps = [app_name_for(*p.key) for p in gone]
                await self._serve.delete(apps, drain=False)
            await self._replace_lost()
        await self._save()

    def _alive_nodes(self) -> set[str]:
        """The names of the nodes Ray's GCS calls alive, as of the last inventory tick."""
        return {n.labels.get(LABEL_NODE, "") for n in self._inventory.nodes if n.alive}

    async def _replace_lost(self) -> None:
        """Place the replicas in ``_lost`` where they fit: the planner sees them as running
        on their (down) node, so it keeps each model's count and puts them elsewhere, or
        back on their node if it is up again."""
        specs = self._wanted(list(self._declared.values()))
        nodes, infos = await self._plan_inputs(specs)
        current = list(self._placements.values())
        result = self._plan_with(nodes, infos, specs, current + list(self._lost.values()))
        lost_models = {model for model, _ in self._lost}
        changes = [c for c in diff(current, result) if c.placement.model in lost_models]
        changes = [c for c in changes if c.op == "+" or (c.op == "~" and _grows(c))]
        failed = await self._execute(changes)
        for c in changes:
            model, node = c.placement.key
            if label(c.placement) in failed:
                continue
            added = c.after.replicas - (c.before.replicas if c.before else 0)
            was = trim_lost(self._lost, model, added)
            self._event(
                EventKind.REPLACE, model, node, f"in place of {was} (node lost)", "node_lost"
            )
        for model in sorted({model for model, _ in self._lost}):
            missing = next((u for u in result.unplaced if u.model == model), None)
            failures = [why for c in changes for why in [failed.get(label(c.placement))] if why]
            why = "; ".join(failures) or (missing.reason if missing else "no node can take it")
            if self._not_replaced.get(model) != why:  # said once, not at every retry
                self._not_replaced[model] = why
                where = ", ".join(sorted(node for m, node in self._lost if m == model))
                why = f"not placed elsewhere: {why}"
                self._event(EventKind.NOT_REPLACED, model, where, why, "node_lost")
        for model in set(self._not_replaced) - {model for model, _ in self._lost}:
            del self._not_replaced[model]

    # -- what clients and the CLI ask -------------------------------------------

    async def metrics(self) -> ClusterMetrics:
        """The cluster's state for /metrics: only what the controller already holds (the
        replicas' last load reports, the inventory's last probes and its event counts); a
        scrape must stay cheap."""
        await self._started()
        now = time.monotonic()
        placements = sorted(self._placements.values(), key=lambda p: p.key)
        return ClusterMetrics(
            placements=[
                placement_load(p, self._loads.loads(app_name_for(*p.key), now)) for p in placements
            ],
            nodes=node_uses(self._inventory.snapshot(), placements),
            events=event_counts(self._event_counts),
        )

    async def nodes(self) -> list[NodeStatus]:
        """Every node with its hardware, live use and models."""
        await self._started()
        if not self._inventory.nodes:  # asked before the first tick
            await self._inventory.refresh()
        ids = {n.labels.get(LABEL_NODE): n.node_id for n in self._inventory.nodes if n.alive}
        by_node: dict[str, list[str]] = {}
        for model, node in self._placements:
            if node in ids:
                by_node.setdefault(ids[node], []).append(model)
        return self._inventory.snapshot(by_node)

    async def list_models(self) -> list[LocalModel]:
        """The library's models, and the declared ones (which run their `source`)."""
        await self._started()
        return await asyncio.to_thread(self._catalog.models)

    # -- the model library: reads and deletions here; pulls, creates and copies run in
    # the library service (cluster/library_service.py), off this event loop.

    async def delete_model(self, model: str) -> None:
        """Delete ``model``: refused while models.yaml declares it; its placements go first."""
        await self._started()
        name = (await asyncio.to_thread(self._catalog.library.deletable, model)).name
        if name in self._declared:
            raise InvalidRequest(
                f"{name} is declared in the applied models file; take it out of the file and "
                f"apply it before deleting the model."
            )
        await self.unload_model(name)
        await asyncio.to_thread(self._catalog.library.delete, name)

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        """Make sure ``model`` runs (Ollama's empty prompt); counts as a use of it that asks
        for ``keep_alive`` (None: the model's own)."""
        await self.ensure(model, cause="load")
        self._loads.touch(normalize_name(model), time.monotonic(), keep_alive)

    async def unload_model(self, model: str) -> bool:
        """Unload ``model``'s placements now, down to the replicas models.yaml keeps
        (Ollama's ``keep_alive: 0`` with no prompt); False if none was loaded."""
        await self._started()
        name = normalize_name(model)
        was_failed = name in self._crashes.failed
        self._crashes.clear(name)  # `corral stop` of a failed model: try it afresh next time
        if not self._apps_of(name):
            await asyncio.to_thread(self._catalog.file_of, name)  # ModelNotFound
        async with self._changing:
            mine = [p for p in self._placements.values() if p.model == name]
            keep = self._spec_of(name).replicas.min if name in self._declared else 0
            cuts, total = [], sum(p.replicas for p in mine)
            for p in sorted(mine, key=lambda p: p.replicas):
                n = min(p.replicas, total - keep)
                if n > 0:
                    cuts.append((p, n))
                    total -= n
            gone = await self._unload(cuts, "asked to unload", asked=True) if cuts else []
        for p in gone:
            self._event(
                EventKind.UNLOAD, p.model, p.node, "asked to unload (keep_alive 0)", "asked"
            )
        self._drop_lost(name)  # asked to unload: not to be put back either
        if name not in self._declared and not self._apps_of(name):
            self._on_demand.discard(name)
        await self._save()
        return bool(gone) or was_failed

    async def placements(self) -> list[PlacementView]:
        """What runs where, with the Serve status and the load of each placement, and the
        models given up on."""
        await self._started()
        states = await self._serve.states()
        now, wall = time.monotonic(), time.time()
        rows = []
        for p in sorted(self._placements.values(), key=lambda p: p.key):
            total = sum(q.replicas for q in self._placements.values() if q.model == p.model)
            state, load = states.get(app_name_for(*p.key)), self._load_of(p, now)
            spec, declared = self._spec_of(p.model), p.model in self._declared
            rows.append(
                placement_view(
                    p, state, load, spec, total=total, declared=declared, now=now, wall=wall
                )
            )
        failed = [
            failed_view(f, self._spec_of(f.model), declared=f.model in self._declared)
            for f in self._crashes.failed.values()
            if f.blocks(wall)
        ]
        return rows + failed

    async def ensure(self, model: str, cause: str = "request", origin: str = "") -> list[Route]:
        """The placements serving ``model`` with their load, loading one if it has none.

        Concurrent calls for the same cold model wait on one load. ``cause`` is why a load
        counts as a cold start: a ``request``, or Ollama's ``load`` (an empty prompt).
        ``origin``: the ingress that asks, and will route by the answer for ``ROUTES_TTL``.
        """
        await self._started()
        name = normalize_name(model)
        self._refuse_if_failed(name)
        if not self._apps_of(name):
            await asyncio.to_thread(self._catalog.file_of, name)  # ModelNotFound
            task = self._loading.get(name)
            if task is None:
                task = asyncio.create_task(self._cold_start(name, cause))
                self._loading[name] = task
                task.add_done_callback(lambda _: self._loading.pop(name, None))
            await asyncio.shield(task)
        self._leases.took(name, origin, time.monotonic())
        return self._routes(name)

    def _routes(self, model: str) -> list[Route]:
        now, max_queue = time.monotonic(), self._settings.max_queue
        routes = []
        for p in self._placements.values():
            if p.model == model:
                app = app_name_for(*p.key)
                held = self._loads.held_by_origin(app, now)
                routes.append(Route(app, p.node, p.replicas, p.replicas * max_queue, held))
        return routes

    async def plan(self, specs: list[ModelSpec]) -> PlanReport:
        """What ``apply(specs)`` would change now; changes nothing."""
        await self._started()
        models = await self._catalog.resolve_all(specs)
        return await self._plan(self._wanted(specs), models)

    async def apply(self, specs: list[ModelSpec]) -> PlanReport:
        """Make the placements what ``specs`` ask for; the report says what failed."""
        await self._started()
        models = await self._catalog.resolve_all(specs)
        for spec in specs:  # applying a file again is asking to try them all again
            self._crashes.clear(spec.name)
        async with self._changing:
            report = await self._plan(self._wanted(specs), models)
            self._declared = {s.name: s for s in specs}
            self._on_demand -= set(self._declared)
            self._catalog.declare(models)
            # What nodes took with them is planned afresh from the file.
            self._lost.clear()
            self._not_replaced.clear()
            failed = await self._execute(report.changes)
        await self._save()
        for change in report.changes:
            key = label(change.placement)
            log.info(
                "apply: %s%s", change.describe(), f" FAILED: {failed[key]}" if key in failed else ""
            )
        for missing in report.plan.unplaced:
            log.warning("apply: %s not placed: %s", missing.model, missing.reason)
        return PlanReport(report.plan, report.changes, report.unchanged, failed)

    # -- the models file as text (the dashboard's plan editor) ------------------

    async def models_file(self) -> str:
        """The applied models file, written out from its specs."""
        await self._started()
        return dump_models(list(self._declared.values()))

    async def plan_file(self, text: str, *, apply: bool = False) -> PlanView:
        """``plan`` (or ``apply``) of a models file's ``text``, as ``report_view`` shows it;
        a mistake in the file is an ``InvalidRequest`` naming its line."""
        try:
            specs = parse_models(text, MODELS_FILE_NAME, Path.cwd())
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        report = await (self.apply(specs) if apply else self.plan(specs))
        return report_view(report, applied=apply)

    # -- planning --------------------------------------------------------------

    def _wanted_names(self) -> set[str]:
        return set(self._declared) | self._on_demand

    def _wanted(self, specs: list[ModelSpec]) -> list[ModelSpec]:
        """``specs`` plus the models loaded on demand that they do not declare."""
        declared = {s.name for s in specs}
        demand = [_demand_spec(m) for m in sorted(self._on_demand) if m not in declared]
        return [*specs, *demand]

    async def _plan(
        self, specs: list[ModelSpec], models: dict[str, LocalModel] | None = None
    ) -> PlanReport:
        """Plan ``specs`` against what runs; ``models`` are the files of newly declared specs
        (the others come from the catalog)."""
        nodes, infos = await self._plan_inputs(specs, models)
        current = list(self._placements.values())
        result = self._plan_with(nodes, infos, specs, current)
        changes = diff(current, result)
        touched = {c.placement.key for c in changes}
        unchanged = [p for p in result.placements if p.key not in touched]
        return PlanReport(result, changes, unchanged)

    async def _plan_inputs(
        self, specs: list[ModelSpec], models: dict[str, LocalModel] | None = None
    ) -> tuple[list[PlanNode], dict[str, GgufInfo]]:
        """The nodes and the GGUF facts of each spec's model, for ``_plan_with``."""
        given = models or {}
        files = {s.name: given.get(s.name) or self._catalog.file_of(s.name) for s in specs}
        infos = {
            name: await asyncio.to_thread(read_gguf, m.path, m.projector)
            for name, m in files.items()
        }
        return await self._plan_nodes(), infos

    def _plan_with(
        self,
        nodes: list[PlanNode],
        infos: dict[str, GgufInfo],
        specs: list[ModelSpec],
        current: list[Placement],
    ) -> Plan:
        return plan(
            nodes,
            specs,
            current,
            models=infos,
            default_context=self._settings.num_ctx,
            default_threads=self._settings.num_threads,
        )

    async def _plan_nodes(self) -> list[PlanNode]:
        statuses = (
            self._inventory.snapshot()
            if self._inventory.probes
            else await self._inventory.settle(timeout=5)
        )
        return [_plan_node(s) for s in statuses if LABEL_NODE in s.labels]

    async def _cold_start(self, name: str, cause: str) -> None:
        async with self._changing:
            if self._apps_of(name):
                return
            started = time.monotonic()
            spec = self._declared.get(name) or _demand_spec(name)
            one = spec.model_copy(
                update={"replicas": Replicas(min=max(1, spec.replicas.min), max=spec.replicas.max)}
            )
            others = self._wanted(list(self._declared.values()))
            specs = [*(s for s in others if s.name != name), one]
            nodes, infos = await self._plan_inputs(specs)

            def attempt(victims: Sequence[eviction.Victim]) -> Plan:
                cut = {v.key: v.replicas for v in victims}
                current = [
                    replace(p, replicas=p.replicas - cut.get(p.key, 0))
                    for p in self._placements.values()
                    if p.replicas > cut.get(p.key, 0)
                ]
                return self._plan_with(nodes, infos, specs, current)

            def placed(result: Plan) -> bool:
                return bool(result.for_model(name))

            result = attempt([])
            if not placed(result):
                await self._make_room(name, attempt, placed)
                result = attempt([])
            current = list(self._placements.values())
            new = [c for c in diff(current, result) if c.op == "+" and c.placement.model == name]
            if not new:  # a victim got a request meanwhile and stayed
                raise ServiceUnavailable(
                    f"The model '{name}' cannot be loaded now: the models in its way are busy.",
                    retry_after=5,
                )
            failed = await self._execute(new)
            if failed:
                why = next(iter(failed.values()))
                self._fail_load_crashes(name, [c.placement for c in new], why)
                raise ModelLoadFailed(f"The model '{name}' failed to load: {why}")
            self._crashes.loaded(name, time.time())  # a failed one: on probation
            if name not in self._declared:
                self._on_demand.add(name)
            self._drop_lost(name)  # what a lost node ran of it is back
            await self._save()
            took = time.monotonic() - started
            for c in new:
                self._event(
                    EventKind.LOAD,
                    name,
                    c.placement.node,
                    f"requested; ready in {took:.1f}s",
                    cause,
                )

    def _fail_load_crashes(self, name: str, tried: list[Placement], why: str) -> None:
        """A load whose process died (not one that raised) fails the model as a crash loop
        does: the next requests get a 503 at once instead of crashing it again."""
        for p in tried:
            app = app_name_for(*p.key)
            if self._crashes.deaths.pop(app, None):
                self._crashes.fail(name, p.node, why, time.time())
                self._event(EventKind.FAILED, name, p.node, why, "crash_loop")
                return

    async def _make_room(self, name: str, attempt, placed) -> None:
        """Evict the least recently used idle placements until ``name`` fits (see
        ``cluster/eviction.py``); ServiceUnavailable with the reason if nothing can."""
        now = time.monotonic()
        ordered = eviction.candidates(self._model_states(now), name)
        victims = eviction.choose(ordered, lambda v: placed(attempt(v)))
        if victims is None:
            best = attempt(ordered)
            missing = next((u for u in best.unplaced if u.model == name), None)
            reason = missing.reason if missing else "no node can take it"
            if ordered:
                reason += (
                    f" (counting the memory that evicting all {len(ordered)} idle placements "
                    f"of other models would free)"
                )
            log.warning("cold start of %s refused: %s", name, reason)
            raise ServiceUnavailable(f"The model '{name}' cannot be loaded now: {reason}")
        why = f"to make room for {name}"
        cuts = [(self._placements[v.key], v.replicas) for v in victims]
        for p in await self._unload(cuts, why):
            victim = next(v for v in victims if v.key == p.key)
            self._event(
                EventKind.EVICT,
                p.model,
                p.node,
                f"{why}; least recently used: {victim.describe(now)}",
                "make_room",
            )

    # -- making it so ----------------------------------------------------------

    def _apps_of(self, model: str) -> list[str]:
        return [app_name_for(m, node) for (m, node) in self._placements if m == model]

    async def _execute(self, changes: list[Change]) -> dict[str, str]:
        """Apply ``changes`` to Serve; returns why each failed placement failed."""
        stopping = [c.before for c in changes if c.op == "-" or c.reload]
        removed = time.monotonic()
        for p in stopping:
            self._placements.pop(p.key, None)
            self._forget(p.key)
        if stopping:
            await self._drain(stopping, removed)
            await self._serve.delete([app_name_for(*p.key) for p in stopping])
        for c in changes:
            if c.op == "~" and not c.reload:  # only the replica count: the others keep running
                await self._serve.scale(app_name_for(*c.after.key), c.after.replicas)
        starting = [c.after for c in changes if c.op == "+" or c.op == "~"]
        self._starting.update(app_name_for(*p.key) for p in starting)
        unlent: dict[str, str] = {}  # split placements whose RPC workers did not start
        for p in (c.after for c in changes if c.op == "+" or c.reload):
            self._lent = self._lent or bool(p.parts)
            try:
                parts = await lenders.lend(p, app_name_for(*p.key), self._settings.rpc_ports)
            except ModelLoadFailed as exc:
                unlent[label(p)] = str(exc)
                continue
            self._deployed_at[app_name_for(*p.key)] = time.time()
            await self._serve.deploy(
                app_name_for(*p.key),
                replica_app(
                    self._engine_spec(p, parts),
                    self._replica_options(),
                    num_replicas=p.replicas,
                    actor_options=actor_options(p),
                ),
            )
        try:
            failed = await self._wait_running([p for p in starting if label(p) not in unlent])
        finally:
            self._starting.difference_update(app_name_for(*p.key) for p in starting)
        failed.update(unlent)
        for p in starting:
            name = label(p)
            if name in failed:
                if name not in unlent:  # never deployed otherwise
                    await self._serve.delete([app_name_for(*p.key)])
                log.error("placement %s failed: %s", name, failed[name])
            else:
                self._placements[p.key] = p
                self._loads.ready(p.key, time.monotonic())
        await self._sweep_lenders()
        await self._save()
        return failed

    async def _sweep_lenders(self) -> None:
        """Stop the RPC workers that no placement (running or starting) needs. Once none
        is needed nor left, the ticks stop asking Ray until the next split starts."""
        needed = {
            name
            for p in self._placements.values()
            for name in lenders.needed_by(p, app_name_for(*p.key))
        }
        await lenders.sweep(needed, starting=self._starting)
        self._lent = bool(needed or self._starting)

    async def _without_lenders(self) -> dict[tuple[str, str], str]:
        """The running split placements that lost an RPC worker, and which node's."""
        split = [p for p in self._placements.values() if p.parts]
        if not split:
            return {}
        alive = await lenders.running()
        lost = {}
        for p in split:
            app = app_name_for(*p.key)
            for part in p.parts:
                if lenders.name_of(app, part.node) not in alive:
                    lost[p.key] = part.node
                    break
        return lost

    async def _wait_running(self, placements: list[Placement]) -> dict[str, str]:
        """Wait until each of ``placements`` runs all its replicas; why each that did not
        failed (see ``serve_apps.wait_running``)."""
        loading = [Loading(app_name_for(*p.key), p.node, p.replicas, label(p)) for p in placements]
        return await wait_running(
            self._serve,
            loading,
            self._settings.load_timeout,
            alive=self._alive_nodes,  # the tick refreshes it meanwhile
            crashed=lambda app, node, at_least: self._crashes.reason(
                app, node, time.time(), at_least
            ),
        )

    def _engine_spec(self, p: Placement, parts: tuple[RpcPart, ...] = ()) -> EngineSpec:
        """What ``p``'s replicas load; ``parts``: the RPC workers of a split placement."""
        spec = self._spec_of(p.model)
        model = self._catalog.file_of(p.model)
        return EngineSpec(
            model=p.model,
            path=p.path,
            n_ctx=p.context,
            n_threads=p.threads,
            n_gpu_layers=p.gpu_layers,
            engine=spec.engine,
            options=dict(spec.engine_options),
            # the shape the placement's memory was estimated for (planner._estimate)
            parallel=p.parallel,
            llama=p.llama,
            digest=model.model_digest,
            fetch_from=self._head_url(),
            projector=model.projector,
            projector_digest=model.projector_digest,
            rpc=parts,
        )

    def _head_url(self) -> str:
        """Where other nodes reach this head's API (for ``/api/blobs``)."""
        host, port = self._settings.listen
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _replica_options(self) -> ReplicaOptions:
        s = self._settings
        return ReplicaOptions(
            max_queue=s.max_queue,
            stream_interval=s.stream_interval,
            log_level=s.log_level,
            report_to=(CONTROLLER_ACTOR, NAMESPACE),
        )


def _quietly(task: asyncio.Task) -> None:
    """Done-callback of background work: a retry's failure is already an event."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.info("background work failed: %r", exc)


def _demand_spec(model: str) -> ModelSpec:
    """How a model nobody declared runs: one replica while it is used."""
    return ModelSpec(name=model, replicas=Replicas(min=0, max=1))


def _plan_node(s: NodeStatus) -> PlanNode:
    return PlanNode(
        name=s.name,
        up=s.state == "up",
        ram=s.ram_offered,
        vram=s.vram_offered_mib * MIB,
        gpus=len(s.gpus),
        cores=s.cpu_cores or 1,
        labels=s.labels,
    )


def _grows(c: Change) -> bool:
    """Whether ``c`` only adds replicas to a running placement."""
    return (
        c.before is not None
        and c.after is not None
        and not c.reload
        and (c.after.replicas > c.before.replicas)
    )


def trim_lost(lost: dict[tuple[str, str], Placement], model: str, replicas: int) -> str:
    """Take ``replicas`` of ``model``'s lost replicas off ``lost`` (they were placed again);
    says which they were, as "2 replicas on nas"."""
    taken = []
    for key in sorted(k for k in lost if k[0] == model):
        if replicas <= 0:
            break
        p = lost[key]
        n = min(p.replicas, replicas)
        replicas -= n
        if n == p.replicas:
            del lost[key]
        else:
            lost[key] = replace(p, replicas=p.replicas - n)
        taken.append(f"{n} replica{'s' if n != 1 else ''} on {p.node}")
    return ", ".join(taken) or "nothing"
