"""How the API layer reaches models: the ``ModelBackend`` interface and its Serve version.

The HTTP routes know nothing of Ray. They talk to a ``ModelBackend``;
``ServeBackend`` implements it with the controller actor (which model exists,
"make sure it runs") and Serve handles to the replicas.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from deployments.replica import REPLICA_DEPLOYMENT, Refused, StreamEvent
from nodes.engine import Embeddings, GenerateRequest
from nodes.errors import ServiceUnavailable
from nodes.models import LocalModel

# The controller actor (cluster/controller.py) registers under this name; the
# ingress finds it by name so that deployments/ never imports cluster/.
CONTROLLER_ACTOR = "corral-controller"
NAMESPACE = "corral"
# How long the ingress routes with the placements it last heard of before asking
# again; the controller waits this long between taking a placement out of the
# routes and deleting it.
ROUTES_TTL = 1.0


class ModelBackend(Protocol):
    """What the API routes need from the rest of Corral."""

    async def list_models(self) -> list[LocalModel]:
        """Every model a client may ask for."""
        ...

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[list[StreamEvent]]:
        """Batches of events: ``[Admitted]`` first, ``Finished`` last; or ``[Refused]``."""
        ...

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings | Refused:
        """One vector per text, or ``Refused`` for input the model cannot take."""
        ...

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Every node of the cluster as the controller sees it (JSON-ready)."""
        ...

    async def cluster_placements(self) -> list[dict[str, Any]]:
        """What runs where: every placement with its node, settings and memory (JSON-ready)."""
        ...


class ServeBackend:
    """``ModelBackend`` over the controller actor and Serve replica handles."""

    def __init__(self, controller: str = CONTROLLER_ACTOR, namespace: str = NAMESPACE) -> None:
        self._controller_name = controller
        self._namespace = namespace
        self._controller_handle: ActorHandle | None = None
        # model -> (when the controller was last asked, a handle per placement)
        self._routes: dict[str, tuple[float, list[DeploymentHandle]]] = {}

    def _controller(self) -> ActorHandle:
        if self._controller_handle is None:
            self._controller_handle = ray.get_actor(self._controller_name, self._namespace)
        return self._controller_handle

    async def list_models(self) -> list[LocalModel]:
        return await self._controller().list_models.remote()

    async def _replica(self, model: str) -> DeploymentHandle:
        """A placement of ``model`` to send a request to (any of them, for now)."""
        now = time.monotonic()
        known = self._routes.get(model)
        if known is None or now - known[0] > ROUTES_TTL:
            # Raises ModelNotFound / ModelLoadFailed / ServiceUnavailable; waits while
            # the model loads.
            apps = await self._controller().ensure.remote(model)
            if not apps:
                raise ServiceUnavailable(f"The model '{model}' has no replica right now.")
            handles = {h.app_name: h for h in known[1]} if known else {}
            known = (now, [handles.get(app) or _handle(app) for app in apps])
            self._routes[model] = known
        return random.choice(known[1])

    async def generate(
        self, model: str, request: GenerateRequest
    ) -> AsyncIterator[list[StreamEvent]]:
        handle = await self._replica(model)
        stream = handle.options(stream=True).generate.remote(request)
        done = False
        try:
            async for batch in stream:
                yield batch
            done = True
        finally:
            if not done:
                # The client went away (or the stream failed): stop the generation
                # so the replica is free for the next request.
                stream.cancel()

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings | Refused:
        handle = await self._replica(model)
        return await handle.embed.remote(list(texts))

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        return await self._controller().nodes.remote()

    async def cluster_placements(self) -> list[dict[str, Any]]:
        return await self._controller().placements.remote()


def _handle(app: str) -> DeploymentHandle:
    return serve.get_deployment_handle(
        REPLICA_DEPLOYMENT, app, _check_exists=False, _record_telemetry=False
    )
