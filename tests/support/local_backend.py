"""A ``ModelBackend`` that runs replicas in this process, without Ray.

It uses the real ``ModelReplica`` class (the code Serve runs), so API
tests exercise the real queueing, batching and cancellation paths. Only the
transport differs: direct calls instead of Serve handles.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from deployments.replica import ModelReplica, Refused, StreamEvent
from nodes.engine import Embeddings, EngineSpec, GenerateRequest, load_engine
from nodes.errors import ModelNotFound
from nodes.models import LocalModel


class LocalBackend:
    def __init__(self, specs: Sequence[EngineSpec]) -> None:
        self.specs = {s.model: s for s in specs}
        self.replicas: dict[str, ModelReplica] = {}

    def replica(self, model: str) -> ModelReplica:
        if model not in self.specs:
            raise ModelNotFound(model)
        if model not in self.replicas:
            self.replicas[model] = ModelReplica(load_engine(self.specs[model]))
        return self.replicas[model]

    async def list_models(self) -> list[LocalModel]:
        return [
            LocalModel(name=s.model, path=s.path, size=0, modified_at=0.0)
            for s in self.specs.values()
        ]

    async def generate(
        self, model: str, request: GenerateRequest
    ) -> AsyncIterator[list[StreamEvent]]:
        async for batch in self.replica(model).generate(request):
            yield batch

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        return await self.replica(model).embed(texts, keep_alive=keep_alive)

    async def cluster_nodes(self) -> list[dict]:
        return []  # no cluster in process; the integration suite checks the real view

    async def cluster_placements(self) -> list[dict]:
        return []
