"""Running a request on a placement, and moving it when that placement fails it.

``Dispatcher`` is the one place a request is sent to a replica and the one
place it is tried again, under one policy (``Retries``):

* a request moves to another placement, unseen by the caller, when its replica
  dies before it produced anything, or when its placement goes away (or fails
  another request) while it waits to be admitted; at most ``MOVES`` times;
* a request whose replica dies after it produced output is run again too, from
  the start, on another placement: the dispatcher then sends ``[Restarted]``
  first, so a caller gathering the whole answer drops what it had, and a caller
  that already streamed that output to its client fails instead
  (``deployments/generation.py`` does both);
* the replica processes that died on one request are counted: at
  ``DEATHS_PER_REQUEST`` the request fails with ``ModelCrashed``, so a model
  that crashes on every request does not take each one through every restart.

Each death is told to the controller, which counts them to find a placement
that keeps crashing, and the placement is quarantined by the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.placement_router import PlacementRouter
from deployments.replica import Refused, StreamEvent
from deployments.routing import conversation_of, follows
from nodes.crashes import death_from_error
from nodes.engine import Embeddings, GenerateRequest
from nodes.errors import ModelCrashed, ServiceUnavailable

log = logging.getLogger("corral.backend")

# A request its replica has not admitted after this long looks again at its placement: one
# that is gone (its node left) or failed a request meanwhile sends it elsewhere.
ADMIT_CHECK = 1.0
MOVES = 3  # placements a request may try after the first
# Replicas whose process may die on one request before it fails: a model that crashes on
# every request must not take each request through every restart Serve makes.
DEATHS_PER_REQUEST = 2


@dataclass(frozen=True, slots=True)
class Restarted:
    """The replica died after the request produced output; what follows is a fresh run
    of it on another placement. ``error`` is the death, for a caller that cannot take
    back what it has already sent."""

    error: RayActorError


@dataclass(slots=True)
class Retries:
    """The retry policy of one request: the placements it tried, the deaths it met."""

    model: str
    tried: set[str] = field(default_factory=set)
    deaths: int = 0

    def next_try(self) -> frozenset[str]:
        """The placements to avoid on the next try; ``ServiceUnavailable`` after ``MOVES``."""
        if len(self.tried) > MOVES:
            raise ServiceUnavailable(
                f"No replica of '{self.model}' took the request: {len(self.tried)} placements "
                f"failed or went away while it waited. Retry it.",
                retry_after=1,
            )
        return frozenset(self.tried)

    def moved(self, app: str) -> None:
        """The request leaves ``app`` for another placement."""
        self.tried.add(app)


class _Moved(Exception):
    """The placement went away, or failed another request, while this one waited."""


class _Died(Exception):
    """The replica's process died on the request (after ``output`` or before any)."""

    def __init__(self, error: RayActorError, output: bool) -> None:
        super().__init__(error)
        self.error = error
        self.output = output


class Dispatcher:
    """Runs requests on the placements ``router`` picks (see the module docstring).

    ``controller`` looks up the controller actor, told of each replica death;
    ``origin`` names this ingress to the replicas.
    """

    def __init__(
        self, router: PlacementRouter, controller: Callable[[], ActorHandle], origin: str
    ) -> None:
        self._router = router
        self._controller = controller
        self._origin = origin

    async def generate(
        self, model: str, request: GenerateRequest
    ) -> AsyncIterator[list[StreamEvent | Restarted]]:
        """The replica's batches: ``[Admitted]`` (or ``[Refused]``) first, once, however
        many placements the request tries; ``[Restarted]`` before a run that starts over."""
        retries = Retries(model)
        conversation = (conversation_of(model, request), follows(request))
        admitted = False  # the caller has had its [Admitted]
        while True:
            app, handle = await self._router.pick(model, retries.next_try(), conversation)
            try:
                async with contextlib.aclosing(self._run(model, app, handle, request)) as run:
                    first = await anext(run)  # [Admitted] or [Refused]
                    if not admitted:
                        admitted = True
                        yield first
                    elif isinstance(first[0], Refused):  # another placement's context
                        raise first[0].error
                    async for batch in run:
                        yield batch
                return
            except _Moved:
                pass
            except _Died as died:
                self._died(retries, app, died.error)
                if died.output:
                    yield [Restarted(died.error)]
            retries.moved(app)

    async def _run(
        self, model: str, app: str, handle: DeploymentHandle, request: GenerateRequest
    ) -> AsyncIterator[list[StreamEvent]]:
        """One try on ``app``; raises ``_Moved`` or ``_Died`` for the next one."""
        with self._router.counted(model, app):
            stream = handle.options(stream=True).generate.remote(request, self._origin)
            done = output = False
            try:
                yield await self._admission(model, app, stream)
                async for batch in stream:
                    output = True
                    yield batch
                done = True
            except RayActorError as exc:
                raise _Died(exc, output) from exc
            finally:
                if not done:
                    # The client went away (or the stream failed): stop the generation
                    # so the replica is free for the next request.
                    stream.cancel()

    async def _admission(self, model: str, app: str, stream) -> list[StreamEvent]:
        """The stream's first batch; ``_Moved`` if, while the request waited for a replica
        of ``app``, it stopped being sound (``PlacementRouter.still_sound``)."""
        first = asyncio.ensure_future(anext(stream))
        try:
            while True:
                done, _ = await asyncio.wait({first}, timeout=ADMIT_CHECK)
                if done:
                    return first.result()
                if not await self._router.still_sound(model, app):
                    log.warning(
                        "placement %s of %s is gone or failing; moving a waiting request",
                        app,
                        model,
                    )
                    raise _Moved
        finally:
            if not first.done():
                first.cancel()

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        """One vector per text; a replica that dies first leaves the work to another
        (embedding twice is harmless)."""
        retries = Retries(model)
        while True:
            app, handle = await self._router.pick(model, retries.next_try())
            with self._router.counted(model, app):
                try:
                    return await handle.embed.remote(list(texts), self._origin, keep_alive)
                except RayActorError as exc:
                    self._died(retries, app, exc)
            retries.moved(app)

    def _died(self, retries: Retries, app: str, exc: RayActorError) -> None:
        """``app``'s replica process died serving a request: route around it, and tell the
        controller, which counts deaths to find a placement that keeps crashing. Raises
        ``ModelCrashed`` once the request has met ``DEATHS_PER_REQUEST`` deaths."""
        model = retries.model
        self._router.quarantine(model, app, exc)
        death = death_from_error(exc)
        with contextlib.suppress(Exception):  # the controller may be restarting: only a count
            self._controller().replica_died.remote(app, death)
        retries.deaths += 1
        if retries.deaths >= DEATHS_PER_REQUEST:
            node = self._router.node_of(app) or "its node"
            raise ModelCrashed(
                f"The model '{model}' crashed while serving this request: its process on "
                f"{node} died ({death.detail}), {retries.deaths} times counting the retry. It "
                f"was not tried again. `corral ps` shows whether the model is now marked "
                f"failed, and why; the process's log is among Ray's logs on {node} "
                f"(worker-*-{death.pid or 'PID'}.err).",
                retry_after=5,
            ) from exc
