"""The puller: one pull of a model from its source into the store, shared by every
caller who asks for the same name, and one download of each blob, shared by every pull
that needs it (see ``nodes.pull`` for the sources and the progress objects)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from nodes.errors import CorralError, InvalidRequest, ModelLoadFailed, PullFailed
from nodes.gguf import GGUF_MAGIC, check_gguf
from nodes.pull import hf
from nodes.pull.names import choose_gguf, choose_projector, local_name, source_of
from nodes.pull.oci import RegistryClient, blobs_of
from nodes.pull.progress import BlobDownload, Broadcast, Emit, Progress
from nodes.pull.transfer import Opener, Transfer, probe, url_opener
from nodes.store import ModelRef, Store, normal_digest

log = logging.getLogger("corral.pull")

MIB = 1024**2


class Puller:
    """Pulls models into ``store`` (see ``nodes.pull``).

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
        self._pulls: dict[str, Broadcast] = {}
        self._blobs: dict[str, BlobDownload] = {}

    async def pull(self, name: str, *, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Ollama's progress objects, ending with ``{"status": "success"}``; errors raise."""
        source = source_of(name)
        target = local_name(name)  # a bad name fails before the first object
        key = f"{source} {name.strip() if source in ('url', 'file') else target}"
        shared = self._pulls.get(key)
        if shared is None:
            shared = self._pulls[key] = Broadcast()
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
        return await self._blob(digest, None, url_opener(url, headers), f"{digest} from {url}")

    async def aclose(self) -> None:
        """Stop every download (a later pull resumes them)."""
        tasks = [p.task for p in self._pulls.values() if p.task]
        tasks += [b.task for b in self._blobs.values() if b.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one pull, shared by its callers --

    async def _run(self, key: str, shared: Broadcast, name: str, insecure: bool) -> None:
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
        registry = RegistryClient(ref, insecure)
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
            manifest = await registry.manifest(client)
        for digest, size in blobs_of(manifest, ref.display):
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
        files, revision = await asyncio.to_thread(hf.list_files, repo, name)
        filename = choose_gguf(files, None if ref.tag == "latest" else ref.tag, repo)
        digest = await self._hf_file(repo, revision, filename, files, emit)
        if files[filename][1]:  # else _download_gguf said it, hashing the file itself
            emit({"status": "verifying sha256 digest"})  # it was, before it was stored
        projector = choose_projector(files, filename)
        projector_digest = ""
        if projector is not None:
            projector_digest = await self._hf_file(repo, revision, projector, files, emit)
        await self._create(local_name(name), digest, emit, projector_digest)

    async def _hf_file(
        self, repo: str, revision: str, filename: str, files: hf.Files, emit: Emit
    ) -> str:
        """One file of a Hugging Face repository into the store; its digest."""
        size, sha256 = files[filename]
        url = hf.file_url(repo, filename, revision)
        opener = url_opener(url, hf.request_headers())
        if not sha256:  # a small file kept in git, not LFS: no sha256 to check it against
            return await self._download_gguf(url, opener, filename, emit)
        digest = normal_digest(f"sha256:{sha256}")
        await self._blob(digest, size, opener, f"{filename} from {repo}", emit)
        return digest

    async def _pull_url(self, url: str, emit: Emit) -> None:
        filename = local_name(url).rsplit(":", 1)[0]
        digest = await self._download_gguf(url, url_opener(url), filename, emit)
        await self._create(local_name(url), digest, emit)

    async def _import_file(self, path: Path, emit: Emit) -> None:
        name = local_name(str(path))
        try:
            await asyncio.to_thread(check_gguf, path)
        except ModelLoadFailed as exc:
            raise InvalidRequest(exc.message) from None
        stat = await asyncio.to_thread(path.stat)
        progress = Progress(emit, f"importing {path.name}", None, stat.st_size)
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
        total, validator = await probe(url, self.timeout)
        progress = Progress(emit, f"pulling {label}", None, total)
        transfer = await asyncio.to_thread(
            Transfer,
            self.store.download_path(url),
            total,
            self.part_size,
            label=url,
            validator=validator,
            progress=progress,
        )
        await self._run_transfer(transfer, opener)
        progress.finish(transfer.completed)
        magic = await asyncio.to_thread(_head, transfer.partial, len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            await asyncio.to_thread(transfer.discard)
            raise PullFailed(f"{url} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
        emit({"status": "verifying sha256 digest"})
        try:
            return await asyncio.to_thread(self.store.commit_download, transfer.partial)
        finally:
            await asyncio.to_thread(transfer.forget)

    # -- blobs, shared by every pull that needs them --

    async def _blob(
        self, digest: str, total: int | None, opener: Opener, label: str, emit: Emit | None = None
    ) -> Path:
        progress = (
            Progress(emit, f"pulling {digest[7:19]}", digest, total) if emit is not None else None
        )
        if self.store.has_blob(digest):
            if progress is not None:
                progress(progress.total or 0)
            return self.store.blob_path(digest)
        download = self._blobs.get(digest)
        joined = download is not None
        if download is None:
            download = self._blobs[digest] = BlobDownload()
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

    def _blob_done(self, digest: str, download: BlobDownload) -> None:
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
        download: BlobDownload,
    ) -> Path:
        partial = self.store.partial_path(digest)
        transfer = await asyncio.to_thread(
            Transfer, partial, total, self.part_size, label, progress=download
        )
        await self._run_transfer(transfer, opener)
        try:
            return await asyncio.to_thread(self.store.commit_partial, digest)
        finally:
            await asyncio.to_thread(transfer.forget)

    async def _run_transfer(self, transfer: Transfer, opener: Opener) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
            await transfer.run(client, opener, self.parts, self.retries)


def _head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path``."""
    with path.open("rb") as f:
        return f.read(n)
