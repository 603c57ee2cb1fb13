"""A ``ModelBackend`` that runs replicas in this process, without Ray.

It uses the real ``ModelReplica`` class (the code Serve runs), so API
tests exercise the real queueing, batching and cancellation paths. Only the
transport differs: direct calls instead of Serve handles.

The model library is kept in memory, enough to test the Ollama routes: a
model created or copied runs on its source's engine settings; a pull fetches
nothing and yields Ollama's progress objects for a model of ``registry``;
blobs live as files in ``blob_dir``.

For /metrics it is one node, ``local``, with one placement per loaded model,
and counts its loads and unloads as the controller counts its events.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from cluster.plan_report import NO_CHANGES
from cluster.spec import parse_models
from cluster.yamlfile import ConfigError
from deployments.replica import ModelReplica, Refused, StreamEvent
from deployments.views import (
    ClusterMetrics,
    Event,
    EventCount,
    NodeStatus,
    NodeUse,
    PlacementLoadView,
    PlacementView,
    PlanView,
)
from nodes.engine import Embeddings, EngineSpec, GenerateRequest, load_engine
from nodes.errors import InvalidRequest, ModelNotFound
from nodes.gguf import read_gguf
from nodes.models import LocalModel, check_name

DEFAULT_KEEP_ALIVE = 300.0  # seconds, Ollama's 5m
NODE = "local"  # the one node of this backend's "cluster"


class LocalBackend:
    def __init__(
        self,
        specs: Sequence[EngineSpec],
        *,
        models: Sequence[LocalModel] = (),
        registry: Mapping[str, str] | None = None,
        blob_dir: Path | None = None,
    ) -> None:
        """``models`` replace the plain entries made for ``specs`` (to give a model
        manifest facts); ``registry`` maps a name a pull may fetch to the model whose
        engine settings it gets."""
        self.specs = {s.model: s for s in specs}
        self.replicas: dict[str, ModelReplica] = {}
        self.models = {s.model: _plain_model(s) for s in specs}
        self.models.update({m.name: m for m in models})
        self.registry = dict(registry or {})
        self.blob_dir = blob_dir
        self.events: Counter[tuple[str, str, str]] = Counter()  # (kind, model, reason) -> n
        self.event_log: list[Event] = []  # as the controller's ``events()``
        self.declared = ""  # the models file "applied" (a plan here changes nothing)

    def replica(self, model: str, cause: str = "request") -> ModelReplica:
        """``model``'s replica, loaded now if it has none (a cold start for ``cause``)."""
        if model not in self.specs:
            raise ModelNotFound(model)
        if model not in self.replicas:
            self.replicas[model] = ModelReplica(load_engine(self.specs[model]))
            self._event("load", model, cause)
        return self.replicas[model]

    async def list_models(self) -> list[LocalModel]:
        return list(self.models.values())

    async def generate(
        self, model: str, request: GenerateRequest
    ) -> AsyncIterator[list[StreamEvent]]:
        async for batch in self.replica(model).generate(request):
            yield batch

    async def embed(
        self, model: str, texts: Sequence[str], keep_alive: float | None = None
    ) -> Embeddings | Refused:
        return await self.replica(model).embed(texts, keep_alive=keep_alive)

    async def cluster_nodes(self) -> list[NodeStatus]:
        return []  # no cluster in process; the integration suite checks the real view

    async def cluster_placements(self) -> list[PlacementView]:
        """One placement on node "local" per loaded model, shaped as the controller's."""
        return [self._placement(name, r) for name, r in self.replicas.items()]

    def _placement(self, name: str, replica: ModelReplica) -> PlacementView:
        load = replica.load()
        keep_alive = DEFAULT_KEEP_ALIVE if load.keep_alive is None else load.keep_alive
        expires_at = None
        if load.idle_for is not None and keep_alive != math.inf:
            expires_at = time.time() + keep_alive - load.idle_for
        return PlacementView(
            model=name,
            node=NODE,
            app=name,
            status="RUNNING",
            replicas=1,
            in_flight=load.in_flight,
            slots=load.slots,
            idle_for=load.idle_for,
            keep_alive=None if keep_alive == math.inf else keep_alive,
            expires_at=expires_at,
            held=False,
            pinned=False,
            min=0,
            max=1,
            declared=False,
            context=self.specs[name].n_ctx,
            threads=self.specs[name].n_threads,
            gpu_layers=0,
            ram=self.models[name].size,
            vram=0,
            path=self.models[name].path,
            reason="loaded in this process",
        )

    # -- /metrics -------------------------------------------------------------------------

    async def cluster_metrics(self) -> ClusterMetrics:
        """As the controller's: this process's replicas, on this box's memory."""
        loads = {name: replica.load() for name, replica in self.replicas.items()}
        memory = psutil.virtual_memory()
        return ClusterMetrics(
            placements=[
                PlacementLoadView(
                    model=name,
                    node=NODE,
                    replicas=1,
                    in_flight=load.in_flight,
                    queued=load.queued,
                    slots=load.slots,
                )
                for name, load in loads.items()
            ],
            nodes=[
                NodeUse(
                    name=NODE,
                    up=True,
                    placements=len(loads),
                    replicas=len(loads),
                    ram_total=memory.total,
                    ram_used=memory.total - memory.available,
                    vram_total=0,
                    vram_used=0,
                )
            ],
            events=[
                EventCount(kind=kind, model=model, node=NODE, reason=reason, count=n)
                for (kind, model, reason), n in sorted(self.events.items())
            ],
        )

    def _event(self, kind: str, model: str, category: str) -> None:
        self.events[kind, model, category] += 1
        self.event_log.append(
            Event(
                time=time.time(),
                kind=kind,
                model=model,
                node=NODE,
                reason=category,
                category=category,
            )
        )

    async def cluster_events(self, since: float = 0.0) -> list[Event]:
        return [e for e in self.event_log if e.time >= since]

    async def models_file(self) -> str:
        return self.declared

    async def plan_models(self, text: str, apply: bool = False) -> PlanView:
        """No planner in process: a file is read as the controller reads it (its mistakes
        are errors with their line), then plans to no change (the cluster's own planner is
        tested in the integration suite)."""
        try:
            parse_models(text, "models.yaml", Path.cwd())
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        if apply:
            self.declared = text
        return PlanView(changes=[], unchanged=[], unplaced=[], notes=[], summary=NO_CHANGES)

    def requests_in_flight(self) -> dict[tuple[str, str], int]:
        return {(name, NODE): r.load().in_flight for name, r in self.replicas.items()}

    # -- the model library ---------------------------------------------------------------

    def get(self, name: str) -> LocalModel:
        model = self.models.get(_checked(name))
        if model is None:
            raise ModelNotFound(name)
        return model

    async def show_model(self, model: str) -> tuple[LocalModel, dict[str, Any]]:
        found = self.get(model)
        if not Path(found.path).is_file():  # a fake engine's model has no file
            return found, {}
        info = read_gguf(found.path)
        return found, {**info.metadata, "general.parameter_count": info.parameters}

    async def pull(self, model: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        name = _checked(model)
        if name not in self.registry:
            raise ModelNotFound(name)
        source = self.get(self.registry[name])
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        total = max(source.size, 4)
        yield {"status": "pulling manifest"}
        for quarter in range(1, 5):
            yield {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total * quarter // 4,
            }
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        self._add(name, source, self.specs[source.name])
        yield {"status": "success"}

    async def create_model(
        self, model: str, recipe: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        name = _checked(model)
        source, spec = self._source_of(recipe)
        yield {"status": f"using existing layer {source.model_digest or source.path}"}
        yield {"status": "writing manifest"}
        license_ = recipe.get("license")
        self._add(
            name,
            replace(
                source,
                template=recipe.get("template") or source.template,
                system=recipe.get("system") or source.system,
                parameters={**source.parameters, **(recipe.get("parameters") or {})},
                license="\n".join(license_) if isinstance(license_, list) else license_,
            ),
            spec,
        )
        yield {"status": "success"}

    def _source_of(self, recipe: Mapping[str, Any]) -> tuple[LocalModel, EngineSpec]:
        """What a create starts from: the GGUF blob of ``files``, or the model ``from``."""
        if files := recipe.get("files"):
            [digest] = files.values()
            path = self.blob_dir and Path(self.blob_dir, digest.replace(":", "-"))
            if not path or not path.is_file():
                raise InvalidRequest(f"The blob {digest} is not on the server; upload it first.")
            spec = replace(next(iter(self.specs.values())), path=str(path))
            return LocalModel.from_file("", path), spec
        source = self.get(recipe.get("from") or "")
        return source, self.specs[source.name]

    async def copy_model(self, source: str, destination: str) -> None:
        model = self.get(source)
        self._add(_checked(destination), model, self.specs[model.name])

    def _add(self, name: str, source: LocalModel, spec: EngineSpec) -> None:
        self.models[name] = replace(source, name=name, modified_at=time.time(), builtin=False)
        self.specs[name] = replace(spec, model=name)

    async def delete_model(self, model: str) -> None:
        name = self.get(model).name
        del self.models[name], self.specs[name]
        self.replicas.pop(name, None)

    async def load_model(self, model: str, keep_alive: float | None = None) -> None:
        self.replica(model, cause="load")

    async def unload_model(self, model: str) -> bool:
        if self.replicas.pop(model, None) is None:
            return False
        self._event("unload", model, "asked")
        return True

    async def blob_file(self, digest: str) -> str | None:
        path = self.blob_dir and Path(self.blob_dir, digest.replace(":", "-"))
        return str(path) if path and path.is_file() else None

    async def save_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> None:
        if self.blob_dir is None:
            raise InvalidRequest("This backend has no blob directory.")
        partial = Path(self.blob_dir, digest.replace(":", "-") + "-partial")
        sha = hashlib.sha256()
        with partial.open("wb") as out:
            async for chunk in chunks:
                sha.update(chunk)
                out.write(chunk)
        if f"sha256:{sha.hexdigest()}" != digest:
            partial.unlink()
            raise InvalidRequest(f"The uploaded bytes do not hash to {digest}.")
        partial.rename(partial.with_name(digest.replace(":", "-")))


def _plain_model(spec: EngineSpec) -> LocalModel:
    path = Path(spec.path)
    if spec.path and path.is_file():
        model = LocalModel.from_file(spec.model, path)
    else:
        model = LocalModel(name=spec.model, path=spec.path, size=0, modified_at=0.0)
    return replace(model, projector=spec.projector)


def _checked(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="model") from None
