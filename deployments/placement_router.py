"""Where the ingress sends a request: the placements of each model and the load on them.

``PlacementRouter`` keeps what the routing choice (``deployments/routing.py``)
needs and nothing else:

* the route cache: a model's placements, asked of the controller at most every
  ``ROUTES_TTL`` (asking also makes the controller load a model that does not
  run, which a request waits for up to ``load_timeout``), one question at a
  time however many requests wait;
* quarantine: a placement that failed a request gets no new ones from this
  ingress for ``FAILED_FOR``, while another placement of the model can take them;
* the requests this ingress has in flight on each placement (exact; replicas
  report the others') and how long a request of each model takes, for a fair
  ``Retry-After`` when every placement is full;
* the last placement of each conversation, for prefix affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from deployments.replica import REPLICA_DEPLOYMENT
from deployments.routing import Route, Router, Strategy, choose, merge_load, retry_after
from nodes.errors import Overloaded, ServiceUnavailable
from nodes.models import normalize_name

log = logging.getLogger("corral.backend")

# How long the ingress routes with the placements it last heard of before asking
# again; a placement taken out of the routes is deleted once every ingress that had
# them has asked again, or this long after it last did (cluster/route_leases.py).
ROUTES_TTL = 1.0
# A placement whose replica failed a request (its process or node died) gets no new
# requests from this ingress for this long, while another placement of the model can take
# them: enough for the controller to notice a lost node and for Serve to restart a replica.
FAILED_FOR = 10.0
AFFINITY_ENTRIES = 4096  # conversations whose last placement an ingress remembers

# A conversation's affinity key and whether it follows an answered turn (routing.py).
Conversation = tuple[str, bool]


class PlacementRouter:
    """The placement of a model each request goes to, from this ingress's view of them.

    ``controller`` looks up the controller actor; ``origin`` is how replicas tell
    this ingress's requests from other ingresses'.
    """

    def __init__(
        self,
        controller: Callable[[], ActorHandle],
        origin: str,
        *,
        routing: Strategy = "least_loaded",
        prefix_routing: bool = True,
        load_timeout: float = 600.0,
    ) -> None:
        self._controller = controller
        self._origin = origin
        self._router = Router(routing)
        self._prefix_routing = prefix_routing
        self._load_timeout = load_timeout
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
        self._affinity: OrderedDict[str, str] = OrderedDict()

    # -- the route cache -------------------------------------------------------------

    async def routes(self, model: str) -> list[Route]:
        """``model``'s placements, asked of the controller when the last answer is stale."""
        known = self._routes.get(model)
        if known is not None and time.monotonic() - known[0] <= ROUTES_TTL:
            return known[1]
        task = self._refreshing.get(model)
        if task is None:  # one question to the controller, however many requests wait
            task = asyncio.create_task(self._ask_routes(model))
            self._refreshing[model] = task
            task.add_done_callback(lambda _: self._refreshing.pop(model, None))
        return await asyncio.shield(task)

    def forget(self, model: str) -> None:
        """Ask the controller afresh for ``model``'s placements next time (it changed)."""
        self._routes.pop(normalize_name(model), None)

    async def _ask_routes(self, model: str) -> list[Route]:
        # Raises ModelNotFound / ModelLoadFailed / ServiceUnavailable; waits while
        # the model loads (a cold start), but not forever.
        try:
            routes = await asyncio.wait_for(
                self._controller().ensure.remote(model, "request", self._origin),
                self._load_timeout,
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

    # -- the choice ------------------------------------------------------------------

    async def pick(
        self,
        model: str,
        avoid: frozenset[str] = frozenset(),
        conversation: Conversation | None = None,
    ) -> tuple[str, DeploymentHandle]:
        """The placement of ``model`` to send a request to; ``Overloaded`` if all are full.

        Placements in ``avoid``, and those that failed a request lately, are taken only
        when no other placement of the model is left. A ``conversation`` goes back where
        it went last, within the affinity bound (``routing.with_affinity``), once it has
        earlier turns to reuse: ``conversation`` is its key and whether it follows a turn
        already answered. A first turn goes to the least-loaded placement, which is
        remembered for the turns after it."""
        routes = await self.routes(model)
        now = time.monotonic()
        healthy = [r for r in routes if r.app not in avoid and self._failed.get(r.app, 0) < now]
        routes = healthy or routes
        candidates = [merge_load(r, self._in_flight.get(r.app, 0), self._origin) for r in routes]
        holder = self._holder(conversation)
        chosen = choose(self._router, candidates, holder)
        if chosen is None:
            wait = retry_after(candidates, self._seconds_per_request.get(model, 1.0))
            raise Overloaded(
                f"Every replica of '{model}' is busy ({sum(c.load for c in candidates)} requests "
                f"in flight and queued); retry in a moment.",
                retry_after=wait,
            )
        if conversation is not None and self._prefix_routing:
            self._remember(conversation[0], chosen.app)
        handle = self._handles.get(chosen.app)
        if handle is None:
            handle = self._handles[chosen.app] = _handle(chosen.app)
        return chosen.app, handle

    def _holder(self, conversation: Conversation | None) -> str | None:
        """The placement that served the conversation last, if it is worth going back to
        (a first turn has nothing cached worth waiting for)."""
        if conversation is None or not self._prefix_routing or not conversation[1]:
            return None
        return self._affinity.get(conversation[0])

    def _remember(self, key: str, app: str) -> None:
        self._affinity[key] = app
        self._affinity.move_to_end(key)
        if len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    # -- load and failures -----------------------------------------------------------

    @contextlib.contextmanager
    def counted(self, model: str, app: str) -> Iterator[None]:
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

    def quarantine(self, model: str, app: str, exc: BaseException) -> None:
        """``app``'s replica failed a request: route around it for a while and ask the
        controller for the model's placements afresh."""
        log.warning("placement %s of %s failed a request: %r", app, model, exc)
        now = time.monotonic()
        self._failed = {a: until for a, until in self._failed.items() if until > now}
        self._failed[app] = now + FAILED_FOR
        self.forget(model)

    async def still_sound(self, model: str, app: str) -> bool:
        """Whether a request waiting for ``app`` should keep waiting: it is still a
        placement of ``model`` (its node did not leave), and has not failed a request
        while another placement of the model is sound."""
        apps = {r.app for r in await self.routes(model)}
        now = time.monotonic()
        sound = {a for a in apps if self._failed.get(a, 0) < now}
        return app in apps and (app in sound or not sound)

    def node_of(self, app: str) -> str | None:
        """The node of placement ``app``, if this ingress has routed to it."""
        placed = self._placed.get(app)
        return placed[1] if placed else None

    def requests_in_flight(self) -> dict[tuple[str, str], int]:
        """(model, node) -> requests this ingress has sent to that placement and not seen end."""
        return {self._placed[app]: n for app, n in self._in_flight.items()}


def _handle(app: str) -> DeploymentHandle:
    return serve.get_deployment_handle(
        REPLICA_DEPLOYMENT, app, _check_exists=False, _record_telemetry=False
    )
