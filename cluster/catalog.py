"""Which file each model runs: the library's models, and the sources the applied models
file declares (a library model under another name, or a .gguf path on the head).

The controller asks it for every placement it plans or deploys. Its reads touch the
store on disk: the controller calls the blocking ones in a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from cluster.library import Library
from cluster.spec import ModelSpec
from nodes.errors import InvalidRequest, ModelLoadFailed, ModelNotFound
from nodes.gguf import read_gguf
from nodes.models import LocalModel


class Catalog:
    """The model files of one Corral (see module docstring)."""

    def __init__(self, library: Library) -> None:
        self.library = library
        self._declared: dict[str, LocalModel] = {}  # the file of each declared model

    def declare(self, files: dict[str, LocalModel]) -> None:
        """The files of the models file just applied (or read back), by model name."""
        self._declared = dict(files)

    def models(self) -> list[LocalModel]:
        """The library's models and the declared ones, sorted by name (blocking)."""
        models = {m.name: m for m in self.library.models()}
        return sorted({**models, **self._declared}.values(), key=lambda m: m.name)

    def file_of(self, name: str) -> LocalModel:
        """The file ``name`` runs: the declared source, else the library's model (blocking;
        ModelNotFound)."""
        return self._declared.get(name) or self.library.get(name)

    async def resolve_all(self, specs: list[ModelSpec]) -> dict[str, LocalModel]:
        """The model file of every spec, checked readable; InvalidRequest lists every problem."""
        models, problems = {}, []
        for spec in specs:
            try:
                model = await asyncio.to_thread(self.resolve, spec)
                await asyncio.to_thread(read_gguf, model.path, model.projector)
                models[spec.name] = model
            except (InvalidRequest, ModelLoadFailed) as exc:
                problems.append(f"{spec.name}: {exc}")
        if problems:
            raise InvalidRequest("\n".join(problems))
        return models

    def resolve(self, spec: ModelSpec) -> LocalModel:
        """The file ``spec`` asks for, with its projector (blocking; InvalidRequest)."""
        model = self._source(spec)
        if spec.projector:
            path = Path(spec.projector).expanduser()
            if not path.is_file():
                raise InvalidRequest(f"projector {spec.projector} is not a file on the head node")
            model = replace(model, projector=str(path), projector_digest="")
        return model

    def _source(self, spec: ModelSpec) -> LocalModel:
        source = spec.source or spec.name
        if source.endswith(".gguf"):
            path = Path(source).expanduser()
            if not path.is_file():
                raise InvalidRequest(f"source {source} is not a file on the head node")
            return replace(LocalModel.from_file(spec.name, path), name=spec.name)
        try:
            return replace(self.library.get(source), name=spec.name)
        except ModelNotFound:
            have = ", ".join(m.name for m in self.library.models())
            raise InvalidRequest(
                f"source '{source}' is not a model Corral has (it has: {have}); pull it first "
                f"(corral pull {source}) or give the path of a .gguf file on the head node"
            ) from None
