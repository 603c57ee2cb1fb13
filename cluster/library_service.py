"""The model library as its own Ray actor: pulls and creates run here, off the controller.

A pull writes hundreds of megabytes and hashes every byte; a create copies a GGUF into
the store. Run inside the controller, that work shared the event loop that answers
``ensure()`` on every request's path and every ingress's routing refresh, so a large
pull delayed cold starts and routing. ``LibraryService`` is a detached actor on the
head (where the store is), restarted by Ray if it dies; the ingress streams pull and
create progress from it directly. Reads and deletions stay with the controller's own
``Library`` (quick, and a deletion must first unload the model's placements): both work
on the same store, whose writes are atomic renames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from cluster.library import Library
from cluster.settings import CorralSettings
from nodes.logs import setup_logging
from nodes.models import LocalModel


class LibraryService:
    """The long library operations, each awaited in this actor's own event loop."""

    def __init__(self, settings: CorralSettings) -> None:
        setup_logging(settings.log_level)
        self._library = Library(settings.models_path)

    async def ping(self) -> bool:
        return True

    async def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Pull progress, streamed to the caller (a Ray generator); a name already being
        pulled joins that download."""
        async for progress in self._library.pull(model, insecure):
            yield progress

    async def create_model(
        self, model: str, recipe: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Create progress (Ollama's /api/create), streamed like ``pull``."""
        async for progress in self._library.create(model, recipe):
            yield progress

    async def copy_model(self, source: str, destination: str) -> None:
        """Another name for ``source`` (a built-in model is copied into the store first)."""
        await asyncio.to_thread(self._library.copy, source, destination)

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        """The model and its GGUF header (Ollama's ``model_info``)."""
        return await asyncio.to_thread(self._library.show, model)
