"""The model store: Ollama's own layout on disk, written so that a crash never breaks it.

The layout is Ollama's, so ``CORRAL_MODELS`` may point at an existing
``~/.ollama/models`` and its models just work::

    blobs/sha256-<64 hex>                        content-addressed files: the GGUF, and the
                                                 config, template, system, params and license
    manifests/<host>/<namespace>/<model>/<tag>   a Docker v2 manifest (JSON) naming a
                                                 model's config and layers by digest

A name is ``[host/][namespace/]model[:tag]`` (``registry.ollama.ai``, ``library``
and ``latest`` by default). ``ModelRef.parse`` is the one gate between a name a
client sent and a path: it refuses ``..``, empty parts, slashes in the wrong
place and every character outside letters, digits and ``._-`` (400) before any
path is built, so nothing is ever read or written outside the root.

Writes are atomic, so a crash (or a full disk) leaves the store as it was:

- a blob is written to a temporary file beside its final place, hashed, fsynced
  and renamed into place only when its sha256 is the digest it is named by; an
  unfinished download stays in its ``.partial`` file for the next pull to resume;
- a manifest is written the same way (temporary file, fsync, rename), and only
  after every blob it refers to is in place: no manifest ever points at a
  missing blob.

Deleting or replacing a manifest deletes the blobs that no other manifest
refers to. A ``LocalModel`` read from the store takes its details from the
config blob (as Ollama writes it), or from the GGUF header when the config says
nothing, and its template, system prompt, parameters and license from those
layers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.errors import CorralError, InvalidRequest, ModelLoadFailed, ModelNotFound, PullFailed
from nodes.gguf import _human_count, read_gguf
from nodes.models import LocalModel, ModelDetails, model_name

log = logging.getLogger("corral.store")

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_TYPE = "application/vnd.ollama.image.model"
PROJECTOR_TYPE = "application/vnd.ollama.image.projector"  # a vision model's mmproj GGUF
TEMPLATE_TYPE = "application/vnd.ollama.image.template"
SYSTEM_TYPE = "application/vnd.ollama.image.system"
PARAMS_TYPE = "application/vnd.ollama.image.params"
LICENSE_TYPE = "application/vnd.ollama.image.license"

CHUNK = 1024**2
PARTIAL_SUFFIX = ".partial"  # not Ollama's "-partial": its part-by-part files are not ours
_TMP_PREFIX = ".tmp-"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def normal_digest(digest: str) -> str:
    """``sha256:<hex>`` for ``sha256:<hex>`` or ``sha256-<hex>``; InvalidRequest otherwise."""
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise InvalidRequest(
            f"{digest!r} is not a blob digest: write sha256:<64 lowercase hex digits>.",
            param="digest",
        )
    return f"sha256:{match[1]}"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model's full name, each part checked to be safe as a directory name."""

    host: str
    namespace: str
    model: str
    tag: str

    def __post_init__(self) -> None:
        model_name(f"{self.host}/{self.namespace}/{self.model}:{self.tag}")

    @classmethod
    def parse(cls, name: str) -> ModelRef:
        """``llama3.2:1b``, ``ns/model[:tag]`` or ``host[:port]/ns/model[:tag]``."""
        path, tag = model_name(name).rsplit(":", 1)
        *prefix, model = path.split("/")
        if len(prefix) == 2:
            return cls(prefix[0], prefix[1], model, tag)
        if prefix and ":" in prefix[0]:
            raise InvalidRequest(
                f"{name.strip()!r}: a registry with a port needs a namespace too; write "
                f"host:port/namespace/model:tag.",
                param="model",
            )
        return cls(DEFAULT_HOST, prefix[0] if prefix else DEFAULT_NAMESPACE, model, tag)

    @property
    def display(self) -> str:
        """The shortest name (Ollama's): ``m:t``, ``ns/m:t`` or ``host/ns/m:t``."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def registry_path(self) -> str:
        """The repository in the registry v2 API: ``library/llama3.2``."""
        return f"{self.namespace}/{self.model}"


class Store:
    """A model store in Ollama's layout under ``root`` (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"

    # -- blobs --

    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (whether or not it is there)."""
        return self.blobs / normal_digest(digest).replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def partial_path(self, digest: str) -> Path:
        """Where an unfinished download of blob ``digest`` lives."""
        path = self.blob_path(digest)
        return path.with_name(path.name + PARTIAL_SUFFIX)

    def download_path(self, source: str) -> Path:
        """Where an unfinished download whose digest is not known yet (a URL) lives."""
        key = hashlib.sha256(source.encode()).hexdigest()[:32]
        return self.blobs / f"download-{key}{PARTIAL_SUFFIX}"

    def commit_partial(self, digest: str) -> Path:
        """Move a finished download of ``digest`` into place if its bytes hash to it;
        otherwise delete it and raise PullFailed."""
        partial = self.partial_path(digest)
        self._commit(partial, normal_digest(digest), PullFailed)
        return self.blob_path(digest)

    def commit_download(self, partial: Path) -> str:
        """Move a finished ``download_path`` file into place under its sha256; its digest."""
        return self._commit(partial, None, PullFailed)

    def add_file(
        self,
        path: str | Path,
        digest: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Copy ``path`` into the store (hashing as it copies); its ``sha256:<hex>``.

        With ``digest``, a blob the store has already is not copied again, and other
        bytes are refused (InvalidRequest). ``progress(bytes copied)`` follows the copy.
        """
        if digest is not None and self.has_blob(digest):
            return normal_digest(digest)
        source = Path(path)
        if not source.is_file():
            raise InvalidRequest(f"{source} is not a file.")
        tmp = self._tmp_path()
        sha = hashlib.sha256()
        try:
            copied = 0
            with source.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    sha.update(chunk)
                    dst.write(chunk)
                    copied += len(chunk)
                    if progress is not None:
                        progress(copied)
            got = f"sha256:{sha.hexdigest()}"
            if digest is not None and got != normal_digest(digest):
                raise _mismatch(f"The file {source}", got, normal_digest(digest), InvalidRequest)
            if not self.has_blob(got):
                self._place(tmp, got)
            return got
        finally:
            tmp.unlink(missing_ok=True)

    async def save_stream(self, digest: str, chunks: AsyncIterator[bytes]) -> Path:
        """Store an upload that must hash to ``digest`` (Ollama's POST /api/blobs)."""
        expected = normal_digest(digest)
        path = self.blob_path(expected)
        if path.is_file():
            return path
        tmp = self._tmp_path()
        sha = hashlib.sha256()
        try:
            with tmp.open("wb") as f:
                async for chunk in chunks:
                    sha.update(chunk)
                    f.write(chunk)
            got = f"sha256:{sha.hexdigest()}"
            if got != expected:
                raise _mismatch("The upload", got, expected, InvalidRequest)
            await asyncio.to_thread(self._place, tmp, expected)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _commit(self, tmp: Path, expected: str | None, error: type[CorralError]) -> str:
        try:
            with tmp.open("rb") as f:
                got = f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
        except FileNotFoundError:
            raise error(f"The download {tmp.name} vanished before it was checked.") from None
        if expected is not None and got != expected:
            tmp.unlink(missing_ok=True)
            raise _mismatch(f"The download of {expected}", got, expected, error)
        self._place(tmp, got)
        return got

    def _place(self, tmp: Path, digest: str) -> None:
        """fsync ``tmp`` and rename it to blob ``digest``: the blob is whole or absent."""
        _fsync(tmp)
        os.replace(tmp, self.blob_path(digest))
        _fsync(self.blobs)

    def _tmp_path(self) -> Path:
        self.blobs.mkdir(parents=True, exist_ok=True)
        return self.blobs / f"{_TMP_PREFIX}{secrets.token_hex(8)}"

    def _put_bytes(self, data: bytes, media_type: str) -> dict[str, Any]:
        """A small blob (config, template ...) in the store; its manifest entry."""
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if not self.has_blob(digest):
            tmp = self._tmp_path()
            try:
                tmp.write_bytes(data)
                self._place(tmp, digest)
            finally:
                tmp.unlink(missing_ok=True)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    # -- manifests --

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The manifest of ``name``; None if there is none."""
        found = self._read(ModelRef.parse(name))
        return found[1] if found else None

    def put_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        """Write ``name``'s manifest; InvalidRequest if a blob it names is not in the store."""
        data = json.dumps(manifest, separators=(",", ":")).encode()
        self._write_manifest(ModelRef.parse(name), data)

    def create(
        self,
        name: str,
        model_digest: str,
        *,
        template: str | None = None,
        system: str | None = None,
        parameters: dict[str, Any] | None = None,
        license: str | None = None,
        parent: str = "",
        projector_digest: str = "",
    ) -> LocalModel:
        """A model from a GGUF blob already in the store, with Ollama's other layers (and
        a vision model's projector, another GGUF blob)."""
        ref = ModelRef.parse(name)
        model_digest = normal_digest(model_digest)
        path = self.blob_path(model_digest)
        if not path.is_file():
            raise InvalidRequest(
                f"The blob {model_digest} is not in the store; upload it first with "
                f"POST /api/blobs/{model_digest}."
            )
        try:
            info = read_gguf(path)
        except ModelLoadFailed as exc:
            raise InvalidRequest(f"The blob {model_digest} is not a usable model: {exc}") from None
        model_layer = {"mediaType": MODEL_TYPE, "digest": model_digest, "size": info.file_size}
        if parent:
            model_layer["from"] = parent
        layers = [model_layer]
        if projector_digest:
            projector_digest = normal_digest(projector_digest)
            projector = self.blob_path(projector_digest)
            if not projector.is_file():
                raise InvalidRequest(f"The projector blob {projector_digest} is not in the store.")
            size = projector.stat().st_size
            layers.append({"mediaType": PROJECTOR_TYPE, "digest": projector_digest, "size": size})
        extra = (
            (TEMPLATE_TYPE, template),
            (SYSTEM_TYPE, system),
            (LICENSE_TYPE, license),
            (PARAMS_TYPE, json.dumps(parameters) if parameters else None),
        )
        layers += [self._put_bytes(text.encode(), kind) for kind, text in extra if text]
        config = {
            "model_format": "gguf",
            "model_family": info.architecture,
            "model_families": [info.architecture],
            "model_type": _human_count(info.parameters),
            "file_type": info.quantization,
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": self._put_bytes(json.dumps(config).encode(), CONFIG_TYPE),
            "layers": layers,
        }
        self._write_manifest(ref, json.dumps(manifest, separators=(",", ":")).encode())
        return self.get(ref.display)

    def copy(self, source: str, destination: str) -> LocalModel:
        """``destination`` becomes another name for ``source``'s manifest (same blobs)."""
        src, dst = ModelRef.parse(source), ModelRef.parse(destination)
        found = self._read(src)
        if found is None:
            raise ModelNotFound(source)
        self._write_manifest(dst, found[0])
        return self.get(dst.display)

    def remove(self, name: str) -> None:
        """Delete ``name``'s manifest, and the blobs no other manifest refers to."""
        ref = ModelRef.parse(name)
        path = self._manifest_path(ref)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(name) from None
        try:
            referenced = _digests(_parse_manifest(data))
        except ValueError:
            referenced = set()  # a corrupt manifest: remove it, keep every blob
        path.unlink()
        _fsync(path.parent)
        for directory in path.parents:
            if directory == self.manifests or not _remove_if_empty(directory):
                break
        self._drop_unreferenced(referenced)

    # -- models --

    def get(self, name: str) -> LocalModel:
        """The model ``name``; ModelNotFound if it has no manifest or no model layer."""
        ref = ModelRef.parse(name)
        found = self._read(ref)
        model = self._local(ref, *found) if found else None
        if model is None:
            raise ModelNotFound(name)
        return model

    def models(self) -> list[LocalModel]:
        """Every model with a model layer, sorted by name; broken manifests are skipped."""
        found = []
        for path, ref in self._manifest_files():
            try:
                data = path.read_bytes()
                model = self._local(ref, data, _parse_manifest(data))
            except (OSError, ValueError, CorralError) as exc:
                log.warning("skipping the manifest %s: %s", path, exc)
                continue
            if model is not None:
                found.append(model)
        return sorted(found, key=lambda m: m.name)

    def gc(self, max_age: float = 86400.0) -> int:
        """Delete temporary and partial files untouched for ``max_age`` seconds; how many."""
        cutoff = time.time() - max_age
        stale = [
            p
            for p in self.blobs.glob("*")
            if p.name.startswith(_TMP_PREFIX) or PARTIAL_SUFFIX in p.name
        ]
        stale += self.manifests.glob(f"*/*/*/.*{_TMP_PREFIX}*")
        removed = 0
        for path in stale:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- internals --

    def _manifest_path(self, ref: ModelRef) -> Path:
        return self.manifests / ref.host / ref.namespace / ref.model / ref.tag

    def _manifest_files(self) -> Iterator[tuple[Path, ModelRef]]:
        for path in self.manifests.glob("*/*/*/*"):
            if path.name.startswith(".") or not path.is_file():
                continue  # a manifest being written
            host, namespace, model, tag = path.relative_to(self.manifests).parts
            try:
                yield path, ModelRef(host, namespace, model, tag)
            except InvalidRequest:
                log.warning("skipping %s: not a model name", path)

    def _read(self, ref: ModelRef) -> tuple[bytes, dict[str, Any]] | None:
        path = self._manifest_path(ref)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            return data, _parse_manifest(data)
        except ValueError as exc:
            raise ModelLoadFailed(
                f"The manifest of {ref.display} is corrupt ({exc}); pull or create the model again."
            ) from None

    def _write_manifest(self, ref: ModelRef, data: bytes) -> None:
        try:
            manifest = _parse_manifest(data)
        except ValueError as exc:
            raise InvalidRequest(f"Not a manifest the store can keep: {exc}.") from None
        missing = sorted(d for d in _digests(manifest) if not self.has_blob(d))
        if missing:
            raise InvalidRequest(
                f"The manifest of {ref.display} refers to blobs the store lacks: "
                f"{', '.join(missing)}. Upload or pull them first."
            )
        try:
            old = self._read(ref)
        except ModelLoadFailed:
            old = None
        atomic_write(self._manifest_path(ref), data)
        if old is not None:
            self._drop_unreferenced(_digests(old[1]) - _digests(manifest))

    def _drop_unreferenced(self, digests: set[str]) -> None:
        if not digests:
            return
        for path, _ in self._manifest_files():
            try:
                digests -= _digests(_parse_manifest(path.read_bytes()))
            except (OSError, ValueError):
                continue
        for digest in digests:
            self.blob_path(digest).unlink(missing_ok=True)
            log.info("deleted the blob %s: no model uses it", digest)

    def _local(self, ref: ModelRef, data: bytes, manifest: dict[str, Any]) -> LocalModel | None:
        """The model a manifest describes; None if it has no model layer."""
        layers = manifest["layers"]
        model_layer = next((x for x in layers if x.get("mediaType") == MODEL_TYPE), None)
        if model_layer is None:
            return None
        path = self.blob_path(model_layer["digest"])
        if not path.is_file():
            raise ModelLoadFailed(
                f"The model file of {ref.display} ({model_layer['digest']}) is missing from "
                f"{self.blobs}; pull the model again."
            )

        def texts(kind: str) -> list[str]:
            return [self._text(x["digest"]) for x in layers if x.get("mediaType") == kind]

        template, system, params, licenses = (
            texts(k) for k in (TEMPLATE_TYPE, SYSTEM_TYPE, PARAMS_TYPE, LICENSE_TYPE)
        )
        parameters: dict[str, Any] = {}
        for text in params:
            parameters.update(_json(text, f"parameters layer of {ref.display}"))
        config = manifest.get("config")
        projector = next((x for x in layers if x.get("mediaType") == PROJECTOR_TYPE), None)
        projector_path = self.blob_path(projector["digest"]) if projector else None
        if projector_path is not None and not projector_path.is_file():
            raise ModelLoadFailed(
                f"The projector of {ref.display} ({projector['digest']}) is missing from "
                f"{self.blobs}; pull the model again."
            )
        return LocalModel(
            name=ref.display,
            path=str(path),
            size=sum(x["size"] for x in [*layers, *([config] if config else [])]),
            modified_at=self._manifest_path(ref).stat().st_mtime,
            digest=hashlib.sha256(data).hexdigest(),
            model_digest=normal_digest(model_layer["digest"]),
            details=self._details(config, path, model_layer.get("from", "")),
            template=template[-1] if template else None,
            system=system[-1] if system else None,
            parameters=parameters,
            license="\n".join(licenses) if licenses else None,
            projector=str(projector_path) if projector_path else "",
            projector_digest=normal_digest(projector["digest"]) if projector else "",
        )

    def _details(self, config: dict[str, Any] | None, gguf: Path, parent: str) -> ModelDetails:
        """Ollama's details: from the config blob, else from the GGUF header."""
        facts = {}
        if config:
            facts = _json(self._text(config["digest"]), f"config blob {config['digest']}")
        family = facts.get("model_family") or ""
        if family:
            return ModelDetails(
                format=facts.get("model_format") or "gguf",
                family=family,
                families=tuple(facts.get("model_families") or (family,)),
                parameter_size=facts.get("model_type") or "",
                quantization_level=facts.get("file_type") or "",
                parent_model=parent,
            )
        info = read_gguf(gguf)
        return ModelDetails(
            family=info.architecture,
            families=(info.architecture,),
            parameter_size=_human_count(info.parameters),
            quantization_level=info.quantization,
            parent_model=parent,
        )

    def _text(self, digest: str) -> str:
        try:
            return self.blob_path(digest).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelLoadFailed(
                f"The blob {digest} is missing from {self.blobs}; pull the model again."
            ) from None


def _parse_manifest(data: bytes) -> dict[str, Any]:
    """A manifest's JSON, checked to name its config and layers by valid digests."""
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ValueError("no list of layers")
    config = manifest.get("config")
    for entry in [*manifest["layers"], *([config] if config is not None else [])]:
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise ValueError(f"a layer without a size: {entry!r}")
        try:
            normal_digest(entry.get("digest"))
        except InvalidRequest:
            raise ValueError(f"a layer without a valid digest: {entry!r}") from None
    return manifest


def _json(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ModelLoadFailed(f"The {what} is not a JSON object; pull or create the model again.")
    return value


def _digests(manifest: dict[str, Any]) -> set[str]:
    config = manifest.get("config")
    entries = [*manifest["layers"], *([config] if config else [])]
    return {normal_digest(entry["digest"]) for entry in entries}


def _mismatch(what: str, got: str, expected: str, error: type[CorralError]) -> CorralError:
    return error(
        f"{what} hashes to {got}, not {expected}: it was cut short or corrupted on the way, "
        f"or the digest is wrong. Nothing was stored."
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_PREFIX}{secrets.token_hex(8)}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_empty(directory: Path) -> bool:
    try:
        directory.rmdir()
    except OSError:
        return False
    return True
