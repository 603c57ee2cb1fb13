"""How the API layer reaches models: the ``ModelBackend`` interface and its Serve version.

The HTTP routes know nothing of Ray. They talk to a ``ModelBackend``;
``ServeBackend`` implements it by composing three parts: the placement router
(``deployments/placement_router.py``: which placement of a model gets a
request), the dispatcher (``deployments/dispatch.py``: runs it there, and
moves it when that placement fails it) and the library client
(``deployments/library_client.py``: the model library and the head's blobs).
What the controller reports about the cluster passes straight through.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import ray
from ray.actor import ActorHandle

from deployments.actors import CONTROLLER_ACTOR, LIBRARY_ACTOR, NAMESPACE
from deployments.dispatch import Dispatcher
from deployments.library_client import LibraryClient
from deployments.placement_router import PlacementRouter
from deployments.replica import Refused, StreamEvent
from deployments.routing import Strategy
from nodes.engine import Embeddings, GenerateRequest
from nodes.models import LocalModel
from nodes.store import Store

# The controller actor (cluster/controller.py) registers under this name; the
# ingress finds it by name so that deployments/ never imports cluster/.


class ModelBackend(Protocol):
    """What the API routes need from the rest of Corral."""

    async def list_models(self) -> list[LocalModel]:
        """Every model a client may ask for."""
        ...

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[list[StreamEvent]]:
        """Batches of events: ``[Admitted]`` first, ``Finished`` last; or ``[Refused]``. A
        run that starts over on another placement after output begins with ``[Restarted]``
        (``deployments/dispatch.py``; ``deployments/generation.py`` takes it)."""
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

    Each request goes to the placement the router picks from the loads this
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
        library: str = LIBRARY_ACTOR,
        routing: Strategy = "least_loaded",
        prefix_routing: bool = True,
        load_timeout: float = 600.0,
        store: Store | None = None,
    ) -> None:
        self._controller = named_actor(controller, namespace)
        self.origin = f"ingress-{uuid.uuid4().hex[:12]}"  # how replicas tell us apart
        self._router = PlacementRouter(
            self._controller,
            self.origin,
            routing=routing,
            prefix_routing=prefix_routing,
            load_timeout=load_timeout,
        )
        self._dispatcher = Dispatcher(self._router, self._controller, self.origin)
        self._library = LibraryClient(
            library=named_actor(library, namespace), controller=self._controller, store=store
        )

    async def list_models(self) -> list[LocalModel]:
        return await self._controller().list_models.remote()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[list[StreamEvent]]:
        """The replica's batches. A request that has produced nothing yet when its replica
        dies (or whose placement goes away while it waits for a replica) moves to another
        placement, unseen by the caller; one that had produced output runs again after a
        ``[Restarted]`` batch (``deployments/dispatch.py``). A request whose replica dies
        twice fails with ``ModelCrashed``."""
        return self._dispatcher.generate(model, request)

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        return await self._dispatcher.embed(model, texts, keep_alive)

    def requests_in_flight(self) -> dict[tuple[str, str], int]:
        return self._router.requests_in_flight()

    # -- what the controller reports about the cluster ------------------------------

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

    # -- the model library (deployments/library_client.py) --------------------------

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        return await self._library.show_model(model)

    def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        return self._library.pull(model, insecure)

    def create_model(self, model: str, recipe: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._library.create_model(model, recipe)

    async def copy_model(self, source: str, destination: str) -> None:
        await self._library.copy_model(source, destination)

    async def delete_model(self, model: str) -> None:
        self._router.forget(model)
        await self._library.delete_model(model)

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        await self._library.load_model(model, keep_alive)

    async def unload_model(self, model: str) -> bool:
        self._router.forget(model)
        return await self._library.unload_model(model)

    async def blob_file(self, digest: str) -> str | None:
        return await self._library.blob_file(digest)

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        await self._library.save_blob(digest, chunks)


def named_actor(name: str, namespace: str) -> Callable[[], ActorHandle]:
    """A lookup of the Ray actor ``name``: by name on first use (the actor may start
    after the ingress), the same handle after that."""
    found: list[ActorHandle] = []

    def lookup() -> ActorHandle:
        if not found:
            found.append(ray.get_actor(name, namespace))
        return found[0]

    return lookup
