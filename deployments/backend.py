"""How the API layer reaches models: the ``ModelBackend`` interface and its Serve version.

The HTTP routes know nothing of Ray. They talk to a ``ModelBackend``;
``ServeBackend`` implements it with the controller actor (which model exists,
"make sure it runs") and Serve handles to the replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.context import current_request
from deployments.replica import REPLICA_DEPLOYMENT, Refused, StreamEvent
from deployments.routing import (
    Route,
    Router,
    Strategy,
    conversation_key,
    merge_load,
    retry_after,
    with_affinity,
)
from nodes.crashes import ProcessDeath, death_from_error
from nodes.engine import Embeddings, GenerateRequest
from nodes.errors import InvalidRequest, ModelCrashed, Overloaded, ServiceUnavailable
from nodes.models import LocalModel, normalize_name
from nodes.store import Store

log = logging.getLogger("corral.backend")

# The controller actor (cluster/controller.py) registers under this name; the
# ingress finds it by name so that deployments/ never imports cluster/.
CONTROLLER_ACTOR = "corral-controller"
NAMESPACE = "corral"
# How long the ingress routes with the placements it last heard of before asking
# again; the controller waits this long between taking a placement out of the
# routes and deleting it.
ROUTES_TTL = 1.0
# A placement whose replica failed a request (its process or node died) gets no new
# requests from this ingress for this long, while another placement of the model can take
# them: enough for the controller to notice a lost node and for Serve to restart a replica.
FAILED_FOR = 10.0
# A request its replica has not admitted after this long looks again at its placement: one
# that is gone (its node left) or failed a request meanwhile sends it elsewhere.
ADMIT_CHECK = 1.0
MOVES = 3  # placements a request that was never admitted may try after the first
# Replicas whose process may die on one request before it fails: a model that crashes on
# every request must not take each request through every restart Serve makes.
DEATHS_PER_REQUEST = 2
AFFINITY_ENTRIES = 4096  # conversations whose last placement an ingress remembers


class ModelBackend(Protocol):
    """What the API routes need from the rest of Corral."""

    async def list_models(self) -> list[LocalModel]:
        """Every model a client may ask for."""
        ...

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[list[StreamEvent]]:
        """Batches of events: ``[Admitted]`` first, ``Finished`` last; or ``[Refused]``."""
        ...

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        """One vector per text, or ``Refused`` for input the model cannot take."""
        ...

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Every node of the cluster as the controller sees it (JSON-ready)."""
        ...

    # -- the model library (Ollama's /api/tags, show, pull, create, copy, delete) --

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        """``model`` and its GGUF metadata (scalar keys; arrays as None); ModelNotFound."""
        ...

    def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Ollama's pull progress objects (``status``, ``digest``, ``total``, ``completed``),
        ending with ``{"status": "success"}``. Errors raise: before the first object for a bad
        name, during iteration for a failed download."""
        ...

    def create_model(self, model: str, recipe: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Create ``model`` from Ollama's /api/create fields (``from``, ``files``,
        ``template``, ``system``, ``parameters``, ``license``); yields ``{"status": ...}``."""
        ...

    async def copy_model(self, source: str, destination: str) -> None:
        """Another name for ``source``'s manifest; ModelNotFound, InvalidRequest."""
        ...

    async def delete_model(self, model: str) -> None:
        """Remove ``model``'s name (and blobs no other model uses); ModelNotFound."""
        ...

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        """Make sure a replica of ``model`` runs (an empty Ollama prompt), kept loaded for
        ``keep_alive`` seconds from now (None: the model's own setting)."""
        ...

    async def unload_model(self, model: str) -> bool:
        """Unload every placement of ``model`` now; False if none ran."""
        ...

    async def blob_file(self, digest: str) -> str | None:
        """The path of blob ``digest`` ("sha256:<hex>") on this box, None if absent."""
        ...

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        """Store an uploaded blob; InvalidRequest if its bytes do not hash to ``digest``."""
        ...

    async def cluster_placements(self) -> list[dict[str, Any]]:
        """What runs where: every placement with its node, settings and memory (JSON-ready)."""
        ...

    async def cluster_events(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The controller's recent events (time, kind, model, node, reason, category), oldest
        first, from ``since`` (epoch seconds) on."""
        ...

    async def models_file(self) -> str:
        """The applied models file, as YAML text."""
        ...

    async def plan_models(self, text: str, apply: bool = False) -> dict[str, Any]:
        """What applying the models file ``text`` would change (``apply``: change it), as
        ``corral plan`` says it (JSON-ready); InvalidRequest names the file's mistakes."""
        ...

    # -- /metrics (deployments/metrics.py) --

    async def cluster_metrics(self) -> dict[str, Any]:
        """The cluster's state for a scrape, from what the controller already holds (JSON-ready):
        ``placements`` (model, node, replicas, in_flight, queued), ``nodes`` (name, up,
        placements, replicas, ram_total, ram_used, vram_total, vram_used in bytes; None where
        unknown) and ``events`` (kind, model, node, reason: the event's category, count: the
        total since the controller started)."""
        ...

    def requests_in_flight(self) -> dict[tuple[str, str], int]:
        """(model, node) -> requests this process has sent to that placement and not seen end."""
        ...


class ServeBackend:
    """``ModelBackend`` over the controller actor and Serve replica handles.

    Each request goes to the placement ``router`` picks from the loads this
    ingress counts itself (exact) plus what replicas report holding for other
    ingresses (``deployments/routing.py``). The placements of a model are asked
    of the controller at most every ``ROUTES_TTL``; asking also makes it load the
    model if none runs, which a request waits for up to ``load_timeout``.
    """

    def __init__(
        self,
        controller: str = CONTROLLER_ACTOR,
        namespace: str = NAMESPACE,
        *,
        routing: Strategy = "least_loaded",
        prefix_routing: bool = True,
        load_timeout: float = 600.0,
        store: Store | None = None,
    ) -> None:
        self._controller_name = controller
        self._namespace = namespace
        self._controller_handle: ActorHandle | None = None
        self._router = Router(routing)
        self._load_timeout = load_timeout
        self._store = store  # the head's model store (this ingress runs on the head)
        self.origin = f"ingress-{uuid.uuid4().hex[:12]}"  # how replicas tell us apart
        # model -> (when the controller was last asked, its placements)
        self._routes: dict[str, tuple[float, list[Route]]] = {}
        self._refreshing: dict[str, asyncio.Task[list[Route]]] = {}
        self._handles: dict[str, DeploymentHandle] = {}
        self._in_flight: dict[str, int] = {}  # app -> requests this ingress has on it
        # app -> (model, node) of every placement routed to (bounded: one app per pair)
        self._placed: dict[str, tuple[str, str]] = {}
        self._seconds_per_request: dict[str, float] = {}  # model -> moving average
        self._failed: dict[str, float] = {}  # app -> until when it gets no new requests
        # conversation -> the app that served it last (its replica holds the prefix)
        self._prefix_routing = prefix_routing
        self._affinity: OrderedDict[str, str] = OrderedDict()

    def _controller(self) -> ActorHandle:
        if self._controller_handle is None:
            self._controller_handle = ray.get_actor(self._controller_name, self._namespace)
        return self._controller_handle

    async def list_models(self) -> list[LocalModel]:
        return await self._controller().list_models.remote()

    async def _current_routes(self, model: str) -> list[Route]:
        known = self._routes.get(model)
        if known is not None and time.monotonic() - known[0] <= ROUTES_TTL:
            return known[1]
        task = self._refreshing.get(model)
        if task is None:  # one question to the controller, however many requests wait
            task = asyncio.create_task(self._ask_routes(model))
            self._refreshing[model] = task
            task.add_done_callback(lambda _: self._refreshing.pop(model, None))
        return await asyncio.shield(task)

    async def _ask_routes(self, model: str) -> list[Route]:
        # Raises ModelNotFound / ModelLoadFailed / ServiceUnavailable; waits while
        # the model loads (a cold start), but not forever.
        try:
            routes = await asyncio.wait_for(
                self._controller().ensure.remote(model), self._load_timeout
            )
        except TimeoutError:
            raise ServiceUnavailable(
                f"The model '{model}' is still loading after {self._load_timeout:.0f}s; "
                f"retry later.",
                retry_after=10,
            ) from None
        if not routes:
            raise ServiceUnavailable(
                f"The model '{model}' has no replica right now.", retry_after=1
            )
        self._routes[model] = (time.monotonic(), routes)
        self._placed.update((r.app, (normalize_name(model), r.node)) for r in routes)
        live = {r.app for _, known in self._routes.values() for r in known}
        for app in [a for a in self._handles if a not in live]:
            del self._handles[app]
        return routes

    async def _pick(
        self,
        model: str,
        avoid: frozenset[str] = frozenset(),
        conversation: tuple[str, bool] | None = None,
    ) -> tuple[str, DeploymentHandle]:
        """The placement of ``model`` to send a request to; ``Overloaded`` if all are full.

        Placements in ``avoid``, and those that failed a request lately, are taken only
        when no other placement of the model is left. A ``conversation`` goes back where
        it went last, within the affinity bound (``routing.with_affinity``), once it has
        earlier turns to reuse: ``conversation`` is its key and whether it follows a turn
        already answered. A first turn goes to the least-loaded placement, which is
        remembered for the turns after it."""
        routes = await self._current_routes(model)
        now = time.monotonic()
        healthy = [r for r in routes if r.app not in avoid and self._failed.get(r.app, 0) < now]
        routes = healthy or routes
        candidates = [merge_load(r, self._in_flight.get(r.app, 0), self.origin) for r in routes]
        chosen = self._router.choose(candidates)
        if conversation is not None and self._prefix_routing:
            key, follows = conversation
            if follows:  # a first turn has nothing cached worth waiting for
                chosen = with_affinity(candidates, chosen, self._affinity.get(key))
            if chosen is not None:
                self._affinity[key] = chosen.app
                self._affinity.move_to_end(key)
                if len(self._affinity) > AFFINITY_ENTRIES:
                    self._affinity.popitem(last=False)
        if chosen is None:
            wait = retry_after(candidates, self._seconds_per_request.get(model, 1.0))
            raise Overloaded(
                f"Every replica of '{model}' is busy ({sum(c.load for c in candidates)} requests "
                f"in flight and queued); retry in a moment.",
                retry_after=wait,
            )
        handle = self._handles.get(chosen.app)
        if handle is None:
            handle = self._handles[chosen.app] = _handle(chosen.app)
        return chosen.app, handle

    @contextlib.contextmanager
    def _counted(self, model: str, app: str) -> Iterator[None]:
        """Count a request as in flight on ``app`` while it runs."""
        self._in_flight[app] = self._in_flight.get(app, 0) + 1
        started = time.monotonic()
        try:
            yield
        finally:
            left = self._in_flight[app] - 1
            if left:
                self._in_flight[app] = left
            else:
                del self._in_flight[app]
            took = time.monotonic() - started
            average = self._seconds_per_request.get(model, took)
            self._seconds_per_request[model] = 0.8 * average + 0.2 * took

    def _failing(self, model: str, app: str, exc: BaseException) -> None:
        """``app``'s replica failed a request: route around it for a while and ask the
        controller for the model's placements afresh."""
        log.warning("placement %s of %s failed a request: %r", app, model, exc)
        now = time.monotonic()
        self._failed = {a: until for a, until in self._failed.items() if until > now}
        self._failed[app] = now + FAILED_FOR
        self._routes.pop(normalize_name(model), None)

    def _died(self, model: str, app: str, exc: BaseException, earlier: int) -> ProcessDeath:
        """``app``'s replica process died serving a request: route around it, and tell the
        controller, which counts deaths to find a placement that keeps crashing. Raises
        ``ModelCrashed`` once the request has met ``DEATHS_PER_REQUEST`` deaths."""
        self._failing(model, app, exc)
        death = death_from_error(exc)
        with contextlib.suppress(Exception):  # the controller may be restarting: only a count
            self._controller().replica_died.remote(app, death)
        ctx = current_request()  # a whole request run again (``gather``) counts as one
        met = earlier + 1
        if ctx is not None:
            ctx.replica_deaths += 1
            met = ctx.replica_deaths
        if met >= DEATHS_PER_REQUEST:
            node = self._placed.get(app, (model, "its node"))[1]
            raise ModelCrashed(
                f"The model '{model}' crashed while serving this request: its process on "
                f"{node} died ({death.detail}), {met} times counting the retry. It was not "
                f"tried again. `corral ps` shows whether the model is now marked failed, and "
                f"why; the process's log is among Ray's logs on {node} "
                f"(worker-*-{death.pid or 'PID'}.err).",
                retry_after=5,
            ) from exc
        return death

    async def generate(
        self, model: str, request: GenerateRequest
    ) -> AsyncIterator[list[StreamEvent]]:
        """The replica's batches. A request that has produced nothing yet when its replica
        dies (or whose placement goes away while it waits for a replica) moves to another
        placement, unseen by the caller; once text has come, it fails with the replica. A
        request whose replica dies twice fails with ``ModelCrashed``."""
        avoid: set[str] = set()
        conversation = (_conversation(model, request), _follows(request))
        admitted = False  # the caller has had its [Admitted]
        deaths = 0  # replica processes that died on this request
        while True:
            _give_up_after_moves(model, avoid)
            app, handle = await self._pick(model, frozenset(avoid), conversation)
            with self._counted(model, app):
                stream = handle.options(stream=True).generate.remote(request, self.origin)
                done = output = False
                try:
                    try:
                        first = await self._admission(model, app, stream)
                        if first is not None:
                            if not admitted:
                                admitted = True
                                yield first
                            elif isinstance(first[0], Refused):  # another placement's context
                                raise first[0].error
                            async for batch in stream:
                                output = True
                                yield batch
                            done = True
                            return
                    except RayActorError as exc:
                        self._died(model, app, exc, deaths)
                        deaths += 1
                        if output:  # its process or its node went away: a 503 to retry
                            raise
                    avoid.add(app)
                finally:
                    if not done:
                        # The client went away (or the stream failed): stop the generation
                        # so the replica is free for the next request.
                        stream.cancel()

    async def _admission(self, model: str, app: str, stream) -> list[StreamEvent] | None:
        """The stream's first batch; None if, while the request waited for a replica of
        ``app``, it stopped being a placement of ``model`` (its node left the cluster) or
        failed a request while another placement is sound."""
        first = asyncio.ensure_future(anext(stream))
        try:
            while True:
                done, _ = await asyncio.wait({first}, timeout=ADMIT_CHECK)
                if done:
                    return first.result()
                apps = {r.app for r in await self._current_routes(model)}
                now = time.monotonic()
                sound = {a for a in apps if self._failed.get(a, 0) < now}
                if app not in apps or (app not in sound and sound):
                    log.warning(
                        "placement %s of %s is gone or failing; moving a waiting request",
                        app,
                        model,
                    )
                    return None
        finally:
            if not first.done():
                first.cancel()

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        """One vector per text; a replica that dies first leaves the work to another (once)."""
        avoid: set[str] = set()
        deaths = 0
        while True:
            _give_up_after_moves(model, avoid)
            app, handle = await self._pick(model, frozenset(avoid))
            with self._counted(model, app):
                try:
                    return await handle.embed.remote(list(texts), self.origin, keep_alive)
                except RayActorError as exc:  # embedding twice is harmless
                    self._died(model, app, exc, deaths)
                    deaths += 1
                    avoid.add(app)

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        return await self._controller().nodes.remote()

    async def cluster_placements(self) -> list[dict[str, Any]]:
        return await self._controller().placements.remote()

    async def cluster_metrics(self) -> dict[str, Any]:
        return await self._controller().metrics.remote()

    async def cluster_events(self, since: float = 0.0) -> list[dict[str, Any]]:
        return await self._controller().events.remote(since)

    async def models_file(self) -> str:
        return await self._controller().models_file.remote()

    async def plan_models(self, text: str, apply: bool = False) -> dict[str, Any]:
        return await self._controller().plan_file.remote(text, apply=apply)

    def requests_in_flight(self) -> dict[tuple[str, str], int]:
        return {self._placed[app]: n for app, n in self._in_flight.items()}

    # -- the model library: the controller keeps it; blobs are read and written here, on
    # the head's disk, so that large files never travel through Ray's object store.

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        return await self._controller().show_model.remote(model)

    async def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        async for ref in self._controller().pull.remote(model, insecure):
            yield await ref

    async def create_model(
        self, model: str, recipe: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        async for ref in self._controller().create_model.remote(model, recipe):
            yield await ref

    async def copy_model(self, source: str, destination: str) -> None:
        await self._controller().copy_model.remote(source, destination)

    async def delete_model(self, model: str) -> None:
        self._routes.pop(normalize_name(model), None)
        await self._controller().delete_model.remote(model)

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        await self._controller().load_model.remote(model, keep_alive)

    async def unload_model(self, model: str) -> bool:
        self._routes.pop(normalize_name(model), None)
        return await self._controller().unload_model.remote(model)

    async def blob_file(self, digest: str) -> str | None:
        if self._store is None:
            return None
        path = self._store.blob_path(digest)
        return str(path) if await asyncio.to_thread(path.is_file) else None

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        if self._store is None:
            raise InvalidRequest("This Corral has no model store to upload to.")
        await self._store.save_stream(digest, chunks)


def _give_up_after_moves(model: str, tried: set[str]) -> None:
    if len(tried) > MOVES:
        raise ServiceUnavailable(
            f"No replica of '{model}' took the request: {len(tried)} placements failed or went "
            f"away while it waited. Retry it.",
            retry_after=1,
        )


def _handle(app: str) -> DeploymentHandle:
    return serve.get_deployment_handle(
        REPLICA_DEPLOYMENT, app, _check_exists=False, _record_telemetry=False
    )


def _conversation(model: str, request: GenerateRequest) -> str:
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


def _follows(request: GenerateRequest) -> bool:
    """Whether ``request`` continues a conversation: a message after its first user turn
    (the earlier answer and what came since are what a placement may hold cached)."""
    messages = request.messages or ()
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    return first_user < len(messages) - 1
