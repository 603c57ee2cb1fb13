"""The model library as the ingress reaches it: Ollama's show, pull, create, copy,
delete, load and unload, and the blobs of the head's model store.

Show, pull, create and copy go to the library service (``library``, the actor of
``cluster/library_service.py``), so that long downloads never run on the
controller's event loop; delete, load and unload go to the controller
(``controller``), which unloads a model before deleting it.

Blobs are read and written here, on the head's disk, so that large files never
travel through Ray's object store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.actor import ActorHandle

from nodes.errors import InvalidRequest
from nodes.models import LocalModel
from nodes.store import Store


class LibraryClient:
    """Library calls over Ray actors, and blob I/O on ``store`` (None: no store here)."""

    def __init__(
        self,
        library: Callable[[], ActorHandle],
        controller: Callable[[], ActorHandle],
        store: Store | None = None,
    ) -> None:
        self._library = library
        self._controller = controller
        self._store = store  # the head's model store (the ingress runs on the head)

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        """``model`` and its GGUF metadata; ModelNotFound."""
        return await self._library().show_model.remote(model)

    async def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Ollama's pull progress objects, as the library yields them."""
        async for ref in self._library().pull.remote(model, insecure):
            yield await ref

    async def create_model(
        self, model: str, recipe: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Ollama's create progress objects, as the library yields them."""
        async for ref in self._library().create_model.remote(model, recipe):
            yield await ref

    async def copy_model(self, source: str, destination: str) -> None:
        """Another name for ``source``'s manifest."""
        await self._library().copy_model.remote(source, destination)

    async def delete_model(self, model: str) -> None:
        """Remove ``model``'s name (and blobs no other model uses): the controller's, which
        first unloads its placements and refuses a model the models file declares."""
        await self._controller().delete_model.remote(model)

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        """Make sure a replica of ``model`` runs, kept loaded for ``keep_alive``."""
        await self._controller().load_model.remote(model, keep_alive)

    async def unload_model(self, model: str) -> bool:
        """Unload every placement of ``model`` now; False if none ran."""
        return await self._controller().unload_model.remote(model)

    async def blob_file(self, digest: str) -> str | None:
        """The path of blob ``digest`` in the store, None if absent (or no store)."""
        if self._store is None:
            return None
        path = self._store.blob_path(digest)
        return str(path) if await asyncio.to_thread(path.is_file) else None

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        """Store an uploaded blob; InvalidRequest if there is no store to upload to."""
        if self._store is None:
            raise InvalidRequest("This Corral has no model store to upload to.")
        await self._store.save_stream(digest, chunks)
