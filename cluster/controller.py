"""The controller: one named Ray actor that decides what runs (first version).

It knows which models exist and starts a model's replica (one Serve
application, not exposed over HTTP) the first time a request needs it. Many
requests for a cold model share one load. Later versions add the planner,
autoscaling, keep-alive and eviction here; the ingress only ever asks
"ensure MODEL is served".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time

import ray
from ray import serve

from cluster.inventory import InventoryMonitor
from cluster.settings import CorralSettings
from deployments.backend import CONTROLLER_ACTOR, NAMESPACE
from deployments.replica import REPLICA_DEPLOYMENT, ReplicaOptions, replica_app
from nodes.engine import EngineSpec
from nodes.errors import ModelLoadFailed, ModelNotFound
from nodes.gguf import check_gguf
from nodes.logs import setup_logging
from nodes.models import LocalModel, builtin_models, normalize_name

log = logging.getLogger("corral.controller")

TICK_SECONDS = 2.0  # how often the controller refreshes its view of the cluster
RELOCATE_EVERY = 15  # ticks between asking every replica where it runs


def app_name_for(model: str) -> str:
    """A Serve application name for ``model``: readable, unique, safe in URLs and logs."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"model-{slug}-{hashlib.sha256(model.encode()).hexdigest()[:6]}"


class Controller:
    """Owns the model catalog and the replicas (see module docstring)."""

    def __init__(self, settings: CorralSettings) -> None:
        setup_logging(settings.log_level)
        self._settings = settings
        self._catalog: dict[str, LocalModel] = builtin_models()
        self._running: dict[str, str] = {}  # model -> Serve application name
        self._loading: dict[str, asyncio.Task[str]] = {}
        self._inventory = InventoryMonitor()
        self._model_nodes: dict[str, str] = {}  # model -> id of the node its replica runs on
        self._ticker: asyncio.Task[None] | None = None

    async def ping(self) -> bool:
        """Answers once the controller runs; starts its periodic work on first call."""
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever())
        return True

    async def nodes(self) -> list[dict]:
        """Every node with its hardware, live use and models (JSON-ready)."""
        if not self._inventory.nodes:  # asked before the first tick
            await self._inventory.refresh()
        by_node: dict[str, list[str]] = {}
        for model, node_id in self._model_nodes.items():
            by_node.setdefault(node_id, []).append(model)
        return [s.model_dump() for s in self._inventory.snapshot(by_node)]

    async def _tick_forever(self) -> None:
        ticks = 0
        while True:
            try:
                await self._inventory.refresh()
                await self._locate_replicas(everyone=ticks % RELOCATE_EVERY == 0)
            except Exception:  # noqa: BLE001 - one bad tick must not stop the controller
                log.exception("controller tick failed")
            ticks += 1
            await asyncio.sleep(TICK_SECONDS)

    async def _locate_replicas(self, everyone: bool) -> None:
        """Ask replicas where they run: new ones and those whose node went away every tick,
        all of them now and then (Serve may restart a replica elsewhere)."""
        alive = {n.node_id for n in self._inventory.nodes if n.alive}
        for model, app in list(self._running.items()):
            if not everyone and self._model_nodes.get(model) in alive:
                continue
            handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app, _check_exists=False)
            try:
                self._model_nodes[model] = await asyncio.wait_for(handle.where.remote(), 2)
            except Exception:  # noqa: BLE001 - restarting; located on a later tick
                self._model_nodes.pop(model, None)

    async def list_models(self) -> list[LocalModel]:
        return sorted(self._catalog.values(), key=lambda m: m.name)

    async def running(self) -> dict[str, str]:
        """Loaded models and the Serve application of each."""
        return dict(self._running)

    async def ensure(self, model: str) -> str:
        """Make sure ``model`` has a running replica; return its Serve application name.

        Concurrent calls for the same cold model wait on one load.
        """
        name = normalize_name(model)
        if name not in self._catalog:
            raise ModelNotFound(model)
        if name in self._running:
            return self._running[name]
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._deploy(name))
            self._loading[name] = task
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(task)

    def _spec(self, model: LocalModel) -> EngineSpec:
        return EngineSpec(
            model=model.name,
            path=model.path,
            n_ctx=self._settings.num_ctx,
            n_threads=self._settings.num_threads,
        )

    def _replica_options(self) -> ReplicaOptions:
        s = self._settings
        return ReplicaOptions(
            max_queue=s.max_queue, stream_interval=s.stream_interval, log_level=s.log_level
        )

    async def _deploy(self, name: str) -> str:
        model = self._catalog[name]
        check_gguf(model.path)  # a clear error now beats a replica crash loop later
        app_name = app_name_for(name)
        app = replica_app(self._spec(model), self._replica_options())
        log.info("cold start: loading %s (%s) as %s", name, model.path, app_name)
        started = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.to_thread(serve.run, app, name=app_name, route_prefix=None),
                timeout=self._settings.load_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - reported as a load failure
            await asyncio.to_thread(serve.delete, app_name)
            reason = "timed out" if isinstance(exc, TimeoutError) else _last_line(exc)
            log.error("loading %s failed: %s", name, reason)
            raise ModelLoadFailed(f"The model '{name}' failed to load: {reason}") from None
        log.info("loaded %s in %.1fs", name, time.monotonic() - started)
        self._running[name] = app_name
        return app_name


def _last_line(exc: BaseException) -> str:
    """The informative end of an error that may carry a remote traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def start_controller(
    settings: CorralSettings, node_labels: dict[str, str] | None = None
) -> ray.actor.ActorHandle:
    """Start the controller actor (or find the one already running) and wait for it.

    ``node_labels`` pins it to the node ``corral serve`` runs on (the head, usually),
    so that it does not live on a box that may be unplugged.
    """
    actor = (
        ray.remote(Controller)
        .options(
            name=CONTROLLER_ACTOR,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            label_selector=node_labels or {},
        )
        .remote(settings)
    )
    ray.get(actor.ping.remote())
    return actor
