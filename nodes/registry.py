"""Pulls: how models arrive in the store, and how a node fetches one from the head.

``Puller.pull(name)`` takes a model from one of four sources (``source_of``):

- an Ollama (OCI) registry, by name: ``llama3.2:1b`` is
  ``registry.ollama.ai/library/llama3.2:1b``; ``host/namespace/model:tag``
  names any other registry. The registry v2 protocol, as Ollama speaks it: GET
  the manifest (Docker v2), then each blob it names (the layers, then the
  config). A registry that answers 401 with a ``Bearer`` challenge gets asked
  for an anonymous token at the realm it names (the service and scope it gives),
  and the request is made again with it. ``https`` always, ``http`` when the
  caller says ``insecure`` (a registry on the LAN).
- ``hf.co/<org>/<repo>[:<quant>]``: huggingface_hub lists the repository's
  files with their sha256; ``choose_gguf`` picks the one of the quantization
  asked for (``Q4_K_M`` by default, else the only one), which downloads like a
  registry blob (verified by that sha256) and becomes ``hf.co/org/repo:quant``.
  A repository that holds a vision projector (an ``mmproj`` GGUF) gets it pulled
  too (``choose_projector``), as the model's projector layer.
- an ``http(s)`` URL of a ``.gguf`` file: downloaded, checked to be GGUF,
  hashed, and named after the file (``<stem>:latest``).
- a local ``.gguf`` path: copied into the store, named the same way.

Every download goes through ``_Transfer``: the bytes land in a partial file
beside the blobs, which a later pull resumes from with HTTP ``Range`` instead
of starting over. A file larger than ``part_size`` is fetched as ranges of that
size, ``parts`` of them at once, each written at its offset; which bytes each
range holds is saved beside the partial file (``.partial.json``) before the
first byte and every second after, so a resumed download trusts only bytes it
recorded. A smaller file, or one whose size is unknown, is fetched in one
stream appended to the partial file, whose size is then the record. A server
that ignores ``Range`` gets the whole file fetched again in one stream. Only a
file whose sha256 is the digest it was asked for is renamed into the store
(``Store.commit_partial``): a mismatch fails the pull (``PullFailed``), the bad
file is removed, and no manifest is written. Blobs the store has are not
fetched again; their progress shows them complete.

Two callers pulling the same name share ONE download: the first starts it as a
task, each caller follows its own queue of progress objects (joining late, it
first gets where each layer stands now), and a caller that stops listening
leaves the download running for the others. Two pulls that need the same blob
(two tags of one model) share that blob's download too.

Progress objects are Ollama's: ``{"status": "pulling manifest"}``, then for
each blob ``{"status": "pulling <12 hex>", "digest", "total", "completed"}``
(at most ten a second per blob, the last one complete), ``{"status":
"verifying sha256 digest"}``, ``{"status": "writing manifest"}`` and
``{"status": "success"}``.

``Puller.fetch_blob(digest, url)`` is the same download for a node that lacks
a model's file: from the head's ``/api/blobs/<digest>``, resumable, verified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import httpx

from nodes.errors import CorralError, InvalidRequest, ModelLoadFailed, ModelNotFound, PullFailed
from nodes.gguf import GGUF_MAGIC, check_gguf
from nodes.store import MANIFEST_TYPE, MODEL_TYPE, ModelRef, Store, normal_digest

log = logging.getLogger("corral.registry")

MIB = 1024**2
HF_HOSTS = ("hf.co", "huggingface.co")
DEFAULT_QUANT = "Q4_K_M"
OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 256 * 1024
PROGRESS_INTERVAL = 0.1  # seconds between two progress objects of a blob, per pull
STATE_INTERVAL = 1.0  # seconds between two saves of a download's ranges

Source = Literal["registry", "hf", "url", "file"]
Emit = Callable[[dict[str, Any]], None]
# Opens a streamed GET with these extra headers (Range ...), on this client.
Opener = Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]


def source_of(name: str) -> Source:
    """Where ``pull(name)`` takes the model from (see module docstring)."""
    text = name.strip()
    lower = text.lower()
    if lower.startswith(("http://", "https://")):
        return "url"
    if lower.endswith(".gguf") or text.startswith(("/", "./", "../", "~")):
        return "file"
    if lower.split("/", 1)[0] in HF_HOSTS:
        return "hf"
    return "registry"


def local_name(name: str) -> str:
    """The name ``pull(name)`` stores the model under; InvalidRequest for a bad one."""
    source = source_of(name)
    if source == "registry":
        return ModelRef.parse(name).display
    if source == "hf":
        ref = ModelRef.parse(name.lower())
        return ModelRef(HF_HOSTS[0], ref.namespace, ref.model, ref.tag).display
    text = name.strip()
    filename = Path(text).name
    if source == "url":
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"{text!r} is not a URL: {exc}.") from None
        if not url.host:
            raise InvalidRequest(f"{text!r} is not a URL: it names no host.")
        filename = PurePosixPath(url.path).name  # percent-decoded
    if not filename.lower().endswith(".gguf"):
        raise InvalidRequest(
            f"{text!r} does not name a .gguf file; pull a model name, hf.co/org/repo, or the "
            f"URL or path of a .gguf file."
        )
    stem = re.sub(r"[^a-z0-9_.-]+", "-", filename[: -len(".gguf")].lower())
    stem = re.sub(r"\.{2,}", ".", stem).strip("-.")
    if not stem:
        raise InvalidRequest(f"Cannot make a model name out of {filename!r}; rename the file.")
    return ModelRef.parse(f"{stem}:latest").display


def choose_gguf(files: Iterable[str], quant: str | None, repo: str) -> str:
    """The file of ``repo`` to pull for ``quant`` (``Q4_K_M`` when None, else the only one)."""
    ggufs = sorted(
        (f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()),
        key=lambda f: (f.count("/"), len(f), f),
    )
    if not ggufs:
        raise InvalidRequest(f"hf.co/{repo} has no GGUF file to pull.")

    def matching(q: str) -> list[str]:
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(q)}(?![A-Za-z0-9_])", re.IGNORECASE)
        return [f for f in ggufs if pattern.search(PurePosixPath(f).name)]

    if quant:
        matches = matching(quant)
    else:
        matches = matching(DEFAULT_QUANT) or (ggufs if len(ggufs) == 1 else [])
    whole = [f for f in matches if not _SPLIT.search(f)]
    if whole:
        return whole[0]
    if matches:
        raise InvalidRequest(
            f"hf.co/{repo} has {quant or DEFAULT_QUANT} only split into several files, which "
            f"Corral cannot pull; choose another quantization."
        )
    tags = sorted({_quant_of(f) for f in ggufs if not _SPLIT.search(f)})
    wanted = f"no {quant} file" if quant else f"several GGUF files and no {DEFAULT_QUANT}"
    raise InvalidRequest(
        f"hf.co/{repo} has {wanted}; add one of these tags: {', '.join(tags) or '(none)'}."
    )


_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
# The precision of a projector to pull when a repository has several, best first (the
# projector is small beside the model; llama.cpp's own conversions ship F16).
_PROJECTOR_PREFERENCE = ("f16", "bf16", "f32", "q8_0")


def choose_projector(files: Iterable[str], model_file: str) -> str | None:
    """The vision projector (``mmproj`` GGUF) of a repository for ``model_file``, if any:
    one in the model's folder first, then F16, BF16, F32, Q8_0, then the first by name."""
    folder = str(PurePosixPath(model_file).parent)
    projectors = [
        f
        for f in files
        if f.lower().endswith(".gguf") and "mmproj" in PurePosixPath(f).name.lower()
    ]
    if not projectors:
        return None

    def rank(f: str) -> tuple:
        parts = re.split(r"[-.]", PurePosixPath(f).name[: -len(".gguf")].lower())
        precision = next(
            (i for i, q in enumerate(_PROJECTOR_PREFERENCE) if q in parts),
            len(_PROJECTOR_PREFERENCE),
        )
        return str(PurePosixPath(f).parent) != folder, precision, f

    return min(projectors, key=rank)


def _quant_of(filename: str) -> str:
    """``Q4_K_M`` out of ``Llama-3.2-1B-Instruct-Q4_K_M.gguf`` (the last ``-``/``.`` part)."""
    return re.split(r"[-.]", PurePosixPath(filename).name[: -len(".gguf")])[-1]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class Puller:
    """Pulls models into ``store`` (see module docstring).

    A blob is fetched as ranges of ``part_size`` bytes, ``parts`` of them at once;
    a range that fails is tried again ``retries`` times (resuming where it stopped)
    before the pull fails. ``timeout`` bounds each connect and read, in seconds.
    """

    def __init__(
        self,
        store: Store,
        *,
        parts: int = 4,
        part_size: int = 64 * MIB,
        retries: int = 3,
        timeout: float = 30.0,
    ) -> None:
        if parts < 1 or part_size < 1 or retries < 0:
            raise ValueError("parts and part_size must be positive, retries not negative")
        self.store = store
        self.parts = parts
        self.part_size = part_size
        self.retries = retries
        self.timeout = httpx.Timeout(timeout)
        self._pulls: dict[str, _Broadcast] = {}
        self._blobs: dict[str, _BlobDownload] = {}

    async def pull(self, name: str, *, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Ollama's progress objects, ending with ``{"status": "success"}``; errors raise."""
        source = source_of(name)
        target = local_name(name)  # a bad name fails before the first object
        key = f"{source} {name.strip() if source in ('url', 'file') else target}"
        shared = self._pulls.get(key)
        if shared is None:
            shared = self._pulls[key] = _Broadcast()
            shared.task = asyncio.create_task(self._run(key, shared, name, insecure))
        queue = shared.subscribe()
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            shared.unsubscribe(queue)
        if shared.error is not None:
            raise shared.error

    async def fetch_blob(
        self, digest: str, url: str, headers: dict[str, str] | None = None
    ) -> Path:
        """Blob ``digest`` from ``url`` (the head's /api/blobs), resumable and verified."""
        digest = normal_digest(digest)
        return await self._blob(digest, None, _opener(url, headers), f"{digest} from {url}")

    async def aclose(self) -> None:
        """Stop every download (a later pull resumes them)."""
        tasks = [p.task for p in self._pulls.values() if p.task]
        tasks += [b.task for b in self._blobs.values() if b.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one pull, shared by its callers --

    async def _run(self, key: str, shared: _Broadcast, name: str, insecure: bool) -> None:
        try:
            await self._pull(name.strip(), insecure, shared.publish)
        except asyncio.CancelledError:
            shared.error = PullFailed(f"The pull of {name} was stopped; pull it again to resume.")
            raise
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            shared.error = PullFailed(f"The pull of {name} failed: {exc.strerror or exc}{where}.")
        except Exception as exc:  # noqa: BLE001 - every caller must hear how it ended
            if not isinstance(exc, CorralError):
                log.exception("the pull of %s failed", name)
            shared.error = exc
        finally:
            if self._pulls.get(key) is shared:
                del self._pulls[key]
            shared.close()

    async def _pull(self, name: str, insecure: bool, emit: Emit) -> None:
        source = source_of(name)
        if source == "registry":
            await self._pull_registry(ModelRef.parse(name), insecure, emit)
        elif source == "hf":
            await self._pull_hf(name, emit)
        elif source == "url":
            await self._pull_url(name, emit)
        else:
            await self._import_file(Path(name).expanduser(), emit)

    async def _pull_registry(self, ref: ModelRef, insecure: bool, emit: Emit) -> None:
        emit({"status": "pulling manifest"})
        registry = _Registry(ref, insecure)
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
            manifest = await registry.manifest(client)
        for digest, size in _blobs_of(manifest, ref.display):
            opener = registry.opener(f"/blobs/{digest}")
            await self._blob(digest, size, opener, f"{digest} from {ref.host}", emit)
        emit({"status": "verifying sha256 digest"})  # each blob was, before it was stored
        emit({"status": "writing manifest"})
        await asyncio.to_thread(self.store.put_manifest, ref.display, manifest)
        emit({"status": "success"})

    async def _pull_hf(self, name: str, emit: Emit) -> None:
        ref = ModelRef.parse(name)
        repo = ref.registry_path
        emit({"status": "pulling manifest"})
        files, revision = await asyncio.to_thread(_hf_files, repo, name)
        filename = choose_gguf(files, None if ref.tag == "latest" else ref.tag, repo)
        size, sha256 = files[filename]
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(repo, filename, revision=revision)
        opener = _opener(url, build_hf_headers())
        if sha256:
            digest = normal_digest(f"sha256:{sha256}")
            await self._blob(digest, size, opener, f"{filename} from {repo}", emit)
            emit({"status": "verifying sha256 digest"})  # it was, before it was stored
        else:  # a small file kept in git, not LFS: no sha256 to check it against
            digest = await self._download_gguf(url, opener, filename, emit)
        projector = choose_projector(files, filename)
        projector_digest = ""
        if projector is not None:
            projector_digest = await self._hf_file(repo, revision, projector, files, emit)
        await self._create(local_name(name), digest, emit, projector_digest)

    async def _hf_file(
        self,
        repo: str,
        revision: str,
        filename: str,
        files: dict[str, tuple[int | None, str | None]],
        emit: Emit,
    ) -> str:
        """Another file of a Hugging Face repository (a projector) into the store."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        size, sha256 = files[filename]
        url = hf_hub_url(repo, filename, revision=revision)
        opener = _opener(url, build_hf_headers())
        if not sha256:
            return await self._download_gguf(url, opener, filename, emit)
        digest = normal_digest(f"sha256:{sha256}")
        await self._blob(digest, size, opener, f"{filename} from {repo}", emit)
        return digest

    async def _pull_url(self, url: str, emit: Emit) -> None:
        filename = local_name(url).rsplit(":", 1)[0]
        digest = await self._download_gguf(url, _opener(url), filename, emit)
        await self._create(local_name(url), digest, emit)

    async def _import_file(self, path: Path, emit: Emit) -> None:
        name = local_name(str(path))
        try:
            check_gguf(path)
        except ModelLoadFailed as exc:
            raise InvalidRequest(exc.message) from None
        progress = _Progress(emit, f"importing {path.name}", None, path.stat().st_size)
        loop = asyncio.get_running_loop()

        def copied(n: int) -> None:
            loop.call_soon_threadsafe(progress, n)

        digest = await asyncio.to_thread(self.store.add_file, path, progress=copied)
        await self._create(name, digest, emit)

    async def _create(self, name: str, digest: str, emit: Emit, projector_digest: str = "") -> None:
        emit({"status": "writing manifest"})
        await asyncio.to_thread(self.store.create, name, digest, projector_digest=projector_digest)
        emit({"status": "success"})

    async def _download_gguf(self, url: str, opener: Opener, label: str, emit: Emit) -> str:
        """A file whose digest is not known before: fetched, checked to be GGUF, hashed."""
        total, validator = await _probe(url, self.timeout)
        progress = _Progress(emit, f"pulling {label}", None, total)
        transfer = _Transfer(
            self.store.download_path(url),
            total,
            self.part_size,
            label=url,
            validator=validator,
            progress=progress,
        )
        await self._run_transfer(transfer, opener)
        progress.finish(transfer.completed)
        with transfer.partial.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            transfer.discard()
            raise PullFailed(f"{url} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
        emit({"status": "verifying sha256 digest"})
        try:
            return await asyncio.to_thread(self.store.commit_download, transfer.partial)
        finally:
            transfer.forget()

    # -- blobs, shared by every pull that needs them --

    async def _blob(
        self, digest: str, total: int | None, opener: Opener, label: str, emit: Emit | None = None
    ) -> Path:
        progress = (
            _Progress(emit, f"pulling {digest[7:19]}", digest, total) if emit is not None else None
        )
        if self.store.has_blob(digest):
            if progress is not None:
                progress(progress.total or 0)
            return self.store.blob_path(digest)
        download = self._blobs.get(digest)
        joined = download is not None
        if download is None:
            download = self._blobs[digest] = _BlobDownload()
            download.task = asyncio.create_task(
                self._download(digest, total, opener, label, download)
            )
            download.task.add_done_callback(lambda _: self._blob_done(digest, download))
        if progress is None:
            return await asyncio.shield(download.task)
        download.listeners.add(progress)
        if joined:  # a new download says where it starts (a resumed one, not from 0) itself
            progress(download.completed)
        try:
            return await asyncio.shield(download.task)
        finally:
            download.listeners.discard(progress)

    def _blob_done(self, digest: str, download: _BlobDownload) -> None:
        if self._blobs.get(digest) is download:
            del self._blobs[digest]
        if not download.task.cancelled():
            download.task.exception()  # every waiter got it; do not warn about it again

    async def _download(
        self,
        digest: str,
        total: int | None,
        opener: Opener,
        label: str,
        download: _BlobDownload,
    ) -> Path:
        transfer = _Transfer(
            self.store.partial_path(digest), total, self.part_size, label, progress=download
        )
        await self._run_transfer(transfer, opener)
        try:
            return await asyncio.to_thread(self.store.commit_partial, digest)
        finally:
            transfer.forget()

    async def _run_transfer(self, transfer: _Transfer, opener: Opener) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
            await transfer.run(client, opener, self.parts, self.retries)


class _Broadcast:
    """One pull's progress objects, copied to the queue of every caller following it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self._queues: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._latest: dict[str, dict[str, Any]] = {}  # where each layer stands

    def publish(self, event: dict[str, Any]) -> None:
        self._latest[event.get("digest") or event["status"]] = event
        for queue in self._queues:
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for event in self._latest.values():
            queue.put_nowait(event)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._queues.discard(queue)

    def close(self) -> None:
        for queue in self._queues:
            queue.put_nowait(None)


class _BlobDownload:
    """A blob being fetched, and the progress of every pull waiting for it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Path] | None = None
        self.completed = 0
        self.listeners: set[_Progress] = set()

    def __call__(self, completed: int) -> None:
        self.completed = completed
        for listener in list(self.listeners):
            listener(completed)


class _Progress:
    """Ollama's progress objects for one file of one pull, at most ten a second."""

    def __init__(self, emit: Emit, status: str, digest: str | None, total: int | None) -> None:
        self.emit, self.status, self.digest, self.total = emit, status, digest, total
        self._sent = -1
        self._at = 0.0

    def __call__(self, completed: int) -> None:
        now = time.monotonic()
        done = self.total is not None and completed >= self.total
        if completed == self._sent or (not done and now - self._at < PROGRESS_INTERVAL):
            return
        self._send(completed, now)

    def finish(self, completed: int) -> None:
        """The last object, complete (a file of unknown size is done when its body ends)."""
        self.total = completed
        if completed != self._sent:
            self._send(completed, time.monotonic())

    def _send(self, completed: int, now: float) -> None:
        self._sent, self._at = completed, now
        event: dict[str, Any] = {"status": self.status}
        if self.digest:
            event["digest"] = self.digest
        event |= {"total": self.total or 0, "completed": completed}
        self.emit(event)


@dataclass
class _Part:
    """Bytes ``start`` to ``end`` (exclusive; None: to the end) of a file, ``done`` of them."""

    start: int
    end: int | None
    done: int = 0

    @property
    def offset(self) -> int:
        return self.start + self.done

    @property
    def finished(self) -> bool:
        return self.end is not None and self.offset >= self.end


class _RangeIgnored(Exception):
    """The server answered a ranged request with the whole file (or refused the range)."""


class _Retryable(Exception):
    """A failure that another try may not have: a 5xx, a body cut short."""


class _Transfer:
    """One file downloading into ``partial``, in ranges, resumable (see module docstring)."""

    def __init__(
        self,
        partial: Path,
        total: int | None,
        part_size: int,
        label: str,
        *,
        validator: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.partial = partial
        self.state = partial.with_name(partial.name + ".json")
        self.total = total
        self.part_size = part_size
        self.label = label
        self.validator = validator  # ETag or Last-Modified: the same version of the file
        self.progress = progress or (lambda _: None)
        self.parts = self._plan()
        self.completed = sum(p.done for p in self.parts)
        self._saved_at = 0.0

    @property
    def recorded(self) -> bool:
        """Whether the ranges are written down (else the partial's size is the record)."""
        return len(self.parts) > 1 or self.validator is not None

    def _plan(self) -> list[_Part]:
        saved = self._load()
        if saved is not None:
            return saved
        have = _size(self.partial)
        # A record that does not fit, a version we cannot check, more bytes than the file
        # has: the bytes are of another version of the file, or ranges we lost track of.
        too_long = self.total is not None and have > self.total
        if self.state.exists() or self.validator is not None or too_long:
            self.discard()
            have = 0
        if self.total is None or self.total - have <= self.part_size:
            return [_Part(0, self.total, have)]
        prefix = [_Part(0, have, have)] if have else []
        step = self.part_size
        return prefix + [_Part(s, min(s + step, self.total)) for s in range(have, self.total, step)]

    def _load(self) -> list[_Part] | None:
        try:
            saved = json.loads(self.state.read_text())
            parts = [
                _Part(int(start), None if end is None else int(end), int(done))
                for start, end, done in saved["parts"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        same = saved.get("total") == self.total and saved.get("validator") == self.validator
        return parts if same and self.partial.is_file() else None

    def save(self) -> None:
        if not self.recorded:
            return
        record = {
            "total": self.total,
            "validator": self.validator,
            "parts": [[p.start, p.end, p.done] for p in self.parts],
        }
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.state)
        self._saved_at = time.monotonic()

    def discard(self) -> None:
        """Forget every byte downloaded so far."""
        self.partial.unlink(missing_ok=True)
        self.forget()

    def forget(self) -> None:
        """Drop the record of the ranges (the partial file is gone or committed)."""
        self.state.unlink(missing_ok=True)

    async def run(
        self, client: httpx.AsyncClient, opener: Opener, concurrency: int, retries: int
    ) -> None:
        self.progress(self.completed)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.save()  # the record exists before the first byte it describes
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            try:
                await self._fetch(client, opener, fd, concurrency, retries)
            except _RangeIgnored:
                log.info("%s: the server ignores Range; fetching it whole", self.label)
                await self._refetch(client, opener, fd, retries)
        finally:
            os.close(fd)
            finished = all(p.finished for p in self.parts)
            if not finished and _size(self.partial) == 0:
                self.discard()  # nothing worth resuming from
            elif not finished:
                self.save()

    async def _refetch(
        self, client: httpx.AsyncClient, opener: Opener, fd: int, retries: int
    ) -> None:
        """Everything again, in one stream from the first byte."""
        os.ftruncate(fd, 0)
        self.parts, self.completed = [_Part(0, self.total)], 0
        self.progress(0)
        self.save()
        try:
            await self._fetch(client, opener, fd, 1, retries)
        except _RangeIgnored:
            raise PullFailed(
                f"Downloading {self.label} failed: the connection broke, and the server cannot "
                f"resume (it ignores Range requests)."
            ) from None

    async def _fetch(
        self,
        client: httpx.AsyncClient,
        opener: Opener,
        fd: int,
        concurrency: int,
        retries: int,
    ) -> None:
        pending = deque(p for p in self.parts if not p.finished)

        async def worker() -> None:
            while pending:
                await self._fetch_part(client, opener, fd, pending.popleft(), retries)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, len(pending))):
                    group.create_task(worker())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def _fetch_part(
        self, client: httpx.AsyncClient, opener: Opener, fd: int, part: _Part, retries: int
    ) -> None:
        failures = 0
        while not part.finished:
            before = part.offset
            try:
                await self._stream(client, opener, fd, part)
            except (httpx.TransportError, _Retryable) as exc:
                failures = 1 if part.offset > before else failures + 1
                if failures > retries:
                    raise PullFailed(
                        f"Downloading {self.label} failed after {failures} tries: {_describe(exc)}."
                    ) from None
                log.info("%s: %s; trying again", self.label, _describe(exc))
                await asyncio.sleep(min(0.25 * 2 ** (failures - 1), 5.0))
                continue
            except httpx.HTTPError as exc:  # too many redirects, a body it cannot decode ...
                raise PullFailed(f"Downloading {self.label} failed: {_describe(exc)}.") from None
            if part.end is None:
                part.end = part.offset  # the whole body came: that was all of it

    async def _stream(
        self, client: httpx.AsyncClient, opener: Opener, fd: int, part: _Part
    ) -> None:
        whole = len(self.parts) == 1 and part.offset == 0
        headers = {"Accept-Encoding": "identity"}
        if not whole:
            last = "" if part.end is None else part.end - 1
            headers["Range"] = f"bytes={part.offset}-{last}"
        response = await opener(client, headers)
        try:
            self._check(response, part, whole)
            async for chunk in response.aiter_bytes(CHUNK):
                if part.end is not None:
                    chunk = chunk[: part.end - part.offset]
                _write_at(fd, chunk, part.offset)
                part.done += len(chunk)
                self._advanced(len(chunk))
                if part.finished:
                    break
        finally:
            await response.aclose()
        if part.end is not None and not part.finished:
            raise _Retryable(f"{response.url.host} ended the response early")

    def _check(self, response: httpx.Response, part: _Part, whole: bool) -> None:
        status = response.status_code
        if status == 200 and whole:
            return
        if status == 206 and not whole:
            if _range_start(response.headers.get("content-range", "")) != part.offset:
                raise PullFailed(
                    f"Downloading {self.label} failed: {response.url.host} sent the range "
                    f"{response.headers.get('content-range')!r} for bytes from {part.offset}."
                )
            return
        if status in (200, 416):
            raise _RangeIgnored
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"{response.url} answered {status} {response.reason_phrase}")
        raise PullFailed(
            f"Downloading {self.label} failed: the server answered {status} "
            f"{response.reason_phrase}."
        )

    def _advanced(self, n: int) -> None:
        self.completed += n
        self.progress(self.completed)
        if self.recorded and time.monotonic() - self._saved_at >= STATE_INTERVAL:
            self.save()


class _Registry:
    """One repository of a registry's v2 API, with the Bearer-token challenge handled."""

    def __init__(self, ref: ModelRef, insecure: bool) -> None:
        self.ref = ref
        self.insecure = insecure
        scheme = "http" if insecure else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.registry_path}"
        self._token: str | None = None

    async def manifest(self, client: httpx.AsyncClient) -> dict[str, Any]:
        accept = {"Accept": f"{MANIFEST_TYPE}, {OCI_MANIFEST_TYPE}"}
        try:
            response = await self.get(client, f"/manifests/{self.ref.tag}", accept)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            hint = "" if self.insecure else "; a registry that speaks plain http needs insecure"
            raise PullFailed(
                f"Cannot reach the registry {self.ref.host}: {_describe(exc)}. Check the name "
                f"and the network{hint}."
            ) from None
        status = response.status_code
        if status == 404:
            raise ModelNotFound(self.ref.display)
        if status in (401, 403):
            raise PullFailed(
                f"The registry {self.ref.host} refused {self.ref.display} ({status}): the "
                f"model is private, or its name is misspelt."
            )
        if status != 200:
            raise PullFailed(
                f"The registry {self.ref.host} answered {status} for the manifest of "
                f"{self.ref.display}."
            )
        try:
            return json.loads(body)
        except ValueError:
            raise PullFailed(
                f"The registry {self.ref.host} sent a manifest of {self.ref.display} that is "
                f"not JSON."
            ) from None

    def opener(self, path: str) -> Opener:
        async def open_(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
            return await self.get(client, path, headers)

        return open_

    async def get(
        self, client: httpx.AsyncClient, path: str, headers: dict[str, str]
    ) -> httpx.Response:
        """A streamed GET of ``base + path``; one 401 challenge is answered with a token."""
        response = await self._send(client, path, headers)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("www-authenticate", "")
        await response.aclose()
        self._token = await self._login(client, challenge)
        return await self._send(client, path, headers)

    async def _send(
        self, client: httpx.AsyncClient, path: str, headers: dict[str, str]
    ) -> httpx.Response:
        if self._token:
            headers = {**headers, "Authorization": f"Bearer {self._token}"}
        request = client.build_request("GET", self.base + path, headers=headers)
        return await client.send(request, stream=True)

    async def _login(self, client: httpx.AsyncClient, challenge: str) -> str:
        """An anonymous token from the realm a ``Bearer`` challenge names (as Ollama asks)."""
        scheme, fields = parse_challenge(challenge)
        if scheme != "bearer" or not fields.get("realm"):
            raise PullFailed(
                f"The registry {self.ref.host} wants a login ({challenge or 'no challenge'}); "
                f"Corral pulls only models anyone may pull."
            )
        params = {"scope": fields.get("scope") or f"repository:{self.ref.registry_path}:pull"}
        if fields.get("service"):
            params["service"] = fields["service"]
        try:
            response = await client.get(fields["realm"], params=params)
            token = response.json().get("token") or response.json().get("access_token")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise PullFailed(f"Getting a token from {fields['realm']} failed: {exc}.") from None
        if response.status_code != 200 or not token:
            raise PullFailed(
                f"{fields['realm']} gave no token to pull {self.ref.display} "
                f"({response.status_code}): the model is private, or its name is misspelt."
            )
        return token


def _blobs_of(manifest: Any, name: str) -> list[tuple[str, int]]:
    """(digest, size) of every blob of an Ollama manifest: its layers, then its config."""
    try:
        layers = manifest["layers"]
        blobs = [
            (normal_digest(x["digest"]), int(x["size"])) for x in [*layers, manifest["config"]]
        ]
        has_model = any(x.get("mediaType") == MODEL_TYPE for x in layers)
    except (KeyError, TypeError, ValueError, AttributeError, InvalidRequest):
        raise PullFailed(
            f"The manifest of {name} is not an image manifest Corral understands."
        ) from None
    if not has_model:
        raise PullFailed(f"{name} is not an Ollama model: its manifest has no {MODEL_TYPE} layer.")
    if any(size < 0 for _, size in blobs):
        raise PullFailed(f"The manifest of {name} gives a negative size.")
    return blobs


def _hf_files(repo: str, name: str) -> tuple[dict[str, tuple[int | None, str | None]], str]:
    """Every file of a Hugging Face model repository: {name: (size, sha256)}, and the
    revision they are at (so that every range comes from the same commit)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except GatedRepoError:
        raise PullFailed(
            f"hf.co/{repo} is gated: accept its terms on huggingface.co, log in with "
            f"`hf auth login` (or set HF_TOKEN), and pull again."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(name) from None
    except (HfHubHTTPError, OSError, httpx.HTTPError) as exc:
        raise PullFailed(f"Asking Hugging Face about {repo} failed: {exc}") from None
    files = {
        s.rfilename: (s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    return files, info.sha


async def _probe(url: str, timeout: httpx.Timeout) -> tuple[int | None, str | None]:
    """The size and version (ETag or Last-Modified) a HEAD of ``url`` gives, if any."""
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            response = await client.head(url, headers={"Accept-Encoding": "identity"})
    except httpx.HTTPError:
        return None, None  # the GET will say what is wrong
    if response.status_code != 200:
        return None, None
    length = response.headers.get("content-length")
    validator = response.headers.get("etag") or response.headers.get("last-modified")
    return (int(length) if length and length.isdigit() else None), validator


def _opener(url: str, headers: dict[str, str] | None = None) -> Opener:
    async def open_(client: httpx.AsyncClient, extra: dict[str, str]) -> httpx.Response:
        request = client.build_request("GET", url, headers={**(headers or {}), **extra})
        return await client.send(request, stream=True)

    return open_


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _range_start(content_range: str) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)$", content_range.strip())
    return int(match[1]) if match else None


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
