"""A real OCI registry holding the starter model the way Ollama's registry holds models.

- ``ollama_model`` builds what ``ollama push`` would send for a GGUF file: the
  config blob Ollama writes, the model, template, system, params and license
  layers, and the Docker v2 manifest naming them with Ollama's media types.
  ``write_ollama_layout`` writes it to disk exactly as Ollama lays out
  ``~/.ollama/models`` (without going through Corral's store).
- ``running_registry`` starts Debian's ``docker-registry`` (distribution 2.8)
  on a free port of 127.0.0.1 with its storage in a temporary directory, and
  stops it afterwards; ``push_model`` pushes a model to it as a client of the
  v2 API does (monolithic blob uploads, then the manifest).
- ``RegistryProxy`` stands between a puller and the registry, to see and break
  what travels: it records every request (its Range, the bytes sent back), may
  ask for a Bearer token as public registries do, cut connections after some
  bytes, flip a byte of every blob, ignore Range, or serve a blob as a plain
  ``.gguf`` URL.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.ollama.image."
TOKEN = "corral-test-token"

TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}
LICENSE = "Apache License\nVersion 2.0, January 2004"


@dataclass
class OllamaModel:
    """A model as Ollama's registry and ``~/.ollama/models`` hold it."""

    manifest: dict
    blobs: dict[str, bytes | Path]  # digest -> content (the GGUF stays a file)
    config: dict

    @property
    def manifest_bytes(self) -> bytes:
        """The manifest as Ollama writes it (Go's compact JSON, fields in struct order)."""
        return json.dumps(self.manifest, separators=(",", ":")).encode()

    @property
    def model_digest(self) -> str:
        return self.manifest["layers"][0]["digest"]


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def ollama_model(
    gguf: Path,
    *,
    gguf_digest: str | None = None,
    template: str | None = TEMPLATE,
    system: str | None = SYSTEM,
    params: dict | None = PARAMS,
    license: str | None = LICENSE,
) -> OllamaModel:
    """What ``ollama push`` sends for ``gguf`` with these layers (the starter model's
    family and size in the config, as Ollama writes them)."""
    blobs: dict[str, bytes | Path] = {}
    model_digest = gguf_digest or file_sha256(gguf)
    blobs[model_digest] = gguf
    layers = [
        {"mediaType": LAYER_TYPE + "model", "digest": model_digest, "size": gguf.stat().st_size}
    ]
    texts = {
        "template": template,
        "system": system,
        "license": license,
        "params": json.dumps(params) if params else None,
    }
    for kind, text in texts.items():
        if text is None:
            continue
        data = text.encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        layers.append({"mediaType": LAYER_TYPE + kind, "digest": digest, "size": len(data)})
    config = {
        "model_format": "gguf",
        "model_family": "llama",
        "model_families": ["llama"],
        "model_type": "134.52M",
        "file_type": "Q4_1",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }
    config_data = json.dumps(config, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
    blobs[config_digest] = config_data
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config_data)},
        "layers": layers,
    }
    return OllamaModel(manifest, blobs, config)


def write_ollama_layout(root: Path, name: tuple[str, str, str, str], model: OllamaModel) -> Path:
    """Write ``model`` under ``root`` as Ollama does; ``name`` is (host, namespace, model,
    tag). The GGUF is hard-linked when it can be (copied otherwise). The manifest's path."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, content in model.blobs.items():
        target = blobs / digest.replace(":", "-")
        if target.exists():
            continue
        if isinstance(content, Path):
            try:
                os.link(content, target)
            except OSError:
                shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    manifest = root.joinpath("manifests", *name)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(model.manifest_bytes)
    return manifest


# -- the registry --


@dataclass
class OciRegistry:
    host: str  # "127.0.0.1:PORT"
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_registry(workdir: Path) -> Iterator[OciRegistry]:
    """``docker-registry`` serving from ``workdir`` until the block ends.

    Skips the test when the binary is missing, unless ``CI`` is set: there it
    must be installed (``apt-get install docker-registry``), so the test fails.
    """
    if not REGISTRY_BINARY.is_file():
        message = f"{REGISTRY_BINARY} is missing: apt-get install docker-registry"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    host = f"127.0.0.1:{_free_port()}"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        f"http:\n  addr: {host}\n  secret: corral-test\n"
    )
    log = workdir / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(REGISTRY_BINARY), "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    registry = OciRegistry(host, process, log)
    try:
        _wait_until_up(registry)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(registry: OciRegistry, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {registry.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{registry.url}/v2/", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer in {timeout}s: {registry.log}")


def push_model(registry_url: str, repository: str, tag: str, model: OllamaModel) -> None:
    """Push ``model`` as ``repository:tag``: each blob in one upload, then the manifest."""
    with httpx.Client(base_url=f"{registry_url}/v2/{repository}", timeout=60) as client:
        for digest, content in model.blobs.items():
            if client.head(f"/blobs/{digest}").status_code == 200:
                continue
            started = client.post("/blobs/uploads/")
            assert started.status_code == 202, started.text
            location = started.headers["location"]
            joiner = "&" if "?" in location else "?"
            body = content.read_bytes() if isinstance(content, Path) else content
            done = client.put(
                f"{location}{joiner}digest={digest}",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert done.status_code == 201, done.text
        pushed = client.put(
            f"/manifests/{tag}",
            content=model.manifest_bytes,
            headers={"Content-Type": MANIFEST_TYPE},
        )
        assert pushed.status_code == 201, pushed.text


# -- the proxy --


@dataclass
class Seen:
    """One request the proxy forwarded."""

    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0  # body bytes sent back
    cut: bool = False


@dataclass
class RegistryProxy:
    """An HTTP proxy in front of ``upstream`` (see module docstring); runs in a thread."""

    upstream: str  # "127.0.0.1:PORT"
    require_token: bool = False
    flip: bool = False  # flip the first byte of every blob body
    ignore_range: bool = False
    chunk_delay: float = 0.0  # seconds to wait before each 64 KiB of a blob
    files: dict[str, str] = field(default_factory=dict)  # "/x.gguf" -> upstream path
    seen: list[Seen] = field(default_factory=list)
    token_requests: list[dict[str, list[str]]] = field(default_factory=list)
    max_concurrent_blobs: int = 0
    _budget: int | None = None  # blob bytes to send before cutting connections
    _cuts_left: int | None = None
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> RegistryProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def cut_after(self, nbytes: int | None, times: int | None = None) -> None:
        """Cut blob connections once ``nbytes`` more blob bytes went out (``times`` cuts, or
        every one from then on); None: stop cutting."""
        with self._lock:
            self._budget, self._cuts_left = nbytes, times

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self.token_requests.clear()
            self.max_concurrent_blobs = 0

    def blob_gets(self, digest: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.endswith(f"/blobs/{digest}")]

    def bytes_sent(self, digest: str) -> int:
        return sum(s.sent for s in self.blob_gets(digest))

    def _allowance(self, wanted: int) -> tuple[int, bool]:
        """How much of ``wanted`` blob bytes may go out, and whether to cut after them."""
        with self._lock:
            if self._budget is None:
                return wanted, False
            if wanted < self._budget:
                self._budget -= wanted
                return wanted, False
            allowed = self._budget
            self._budget = 0
            if self._cuts_left is not None:
                self._cuts_left -= 1
                if self._cuts_left <= 0:
                    self._budget = self._cuts_left = None
            return allowed, True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: RegistryProxy
    RELAYED = (
        "content-type",
        "content-length",
        "content-range",
        "accept-ranges",
        "docker-content-digest",
        "etag",
        "last-modified",
    )

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:
            pass  # the puller hung up (a cancelled pull): nothing to report

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._forward("HEAD")

    def do_GET(self) -> None:  # noqa: N802
        split = urlsplit(self.path)
        if split.path == "/token":
            with self.owner._lock:
                self.owner.token_requests.append(parse_qs(split.query))
            self._reply(200, json.dumps({"token": TOKEN}).encode(), "application/json")
            return
        self._forward("GET")

    def _reply(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, method: str) -> None:
        owner = self.owner
        path = owner.files.get(self.path, self.path)
        if self.path.startswith("/v2/") and self.path != "/v2/" and owner.require_token:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                repository = path[len("/v2/") :].split("/manifests/")[0].split("/blobs/")[0]
                challenge = (
                    f'Bearer realm="{owner.url}/token",service="corral-test-registry",'
                    f'scope="repository:{repository}:pull"'
                )
                body = b'{"errors":[{"code":"UNAUTHORIZED"}]}'
                self._reply(401, body, "application/json", WWW_Authenticate=challenge)
                return
        seen = Seen(method, path, self.headers.get("Range"))
        with owner._lock:
            owner.seen.append(seen)
        headers = {"Accept-Encoding": "identity"}
        for name in ("Accept", "Range"):
            if self.headers.get(name) and not (name == "Range" and owner.ignore_range):
                headers[name] = self.headers[name]
        upstream = http.client.HTTPConnection(owner.upstream, timeout=30)
        try:
            upstream.request(method, path, headers=headers)
            response = upstream.getresponse()
            seen.status = response.status
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() in self.RELAYED:
                    self.send_header(name, value)
            self.end_headers()
            if method == "GET":
                self._relay_body(response, seen, blob="/blobs/" in path)
        finally:
            upstream.close()

    def _relay_body(self, response: http.client.HTTPResponse, seen: Seen, blob: bool) -> None:
        owner = self.owner
        if blob:
            with owner._lock:
                owner._active += 1
                owner.max_concurrent_blobs = max(owner.max_concurrent_blobs, owner._active)
        try:
            first = True
            while chunk := response.read(64 * 1024):
                if not blob:
                    self.wfile.write(chunk)
                    continue
                if owner.chunk_delay:
                    time.sleep(owner.chunk_delay)
                if owner.flip and first:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                first = False
                allowed, cut = owner._allowance(len(chunk))
                self.wfile.write(chunk[:allowed])
                seen.sent += allowed
                if cut:
                    seen.cut = True
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the puller went away (cancelled)
        finally:
            if blob:
                with owner._lock:
                    owner._active -= 1
