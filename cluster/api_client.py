"""Corral's HTTP API as the CLI calls it: where it is, the key to send, and each step.

The commands talk to a running Corral over its Ollama API (``/api/pull``,
``/api/tags``, ``/api/chat``, ...), so they work from any box that can reach
it, without Ray and without the model files. Every step is a small function
taking an ``httpx.Client``; what Corral answers instead of doing it is a
``ServerError`` with its words, and a server that cannot be reached is
``Unreachable``. Turning those into an exit status is the commands' business
(``corral()`` in ``cluster/cli_app.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from cluster.progress_view import ProgressView, Row, progress_row, short_digest
from cluster.settings import parse_host
from nodes.models import normalize_name

API_KEY_ENV = "CORRAL_API_KEY"
NEED_KEY = f"set {API_KEY_ENV} to a key made by `corral keys create` on the head"
# Pulls, uploads, loads and answers may take minutes between two bytes; only connecting may not.
LONG = httpx.Timeout(None, connect=10.0)
CHUNK = 1024 * 1024


class ServerError(Exception):
    """What Corral answered instead of doing it: its ``{"error": ...}`` text."""


class Unreachable(Exception):
    """Corral could not be reached, or the connection broke midway; the text says where."""


def api_url(host: str) -> str:
    """Where to reach the API that ``host`` (the listen address) serves."""
    address, port = parse_host(host)
    if address in ("0.0.0.0", "::", ""):
        address = "127.0.0.1"
    return f"http://{f'[{address}]' if ':' in address else address}:{port}"


def api_headers() -> dict[str, str]:
    """The API key of ``CORRAL_API_KEY`` as a bearer header, when it is set."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def connect(url: str) -> httpx.Client:
    """The client every command uses (tests replace it with one on a mock transport);
    it sends the API key of ``CORRAL_API_KEY`` when that is set."""
    return httpx.Client(
        base_url=url, headers=api_headers(), timeout=httpx.Timeout(60.0, connect=10.0)
    )


@contextmanager
def session(url: str) -> Iterator[httpx.Client]:
    """A client for the API at ``url``; a failure to reach it, then or midway, is
    ``Unreachable`` saying which."""
    try:
        with connect(url) as client:
            yield client
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise Unreachable(
            f"cannot reach Corral at {url} ({exc}); is `corral serve` running?"
        ) from None
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        raise Unreachable(f"lost the connection to Corral at {url} ({reason})") from None


def error_text(response: httpx.Response) -> str:
    """The ``error`` of an Ollama error body, else the status and the start of the body;
    a refused key adds how to give one."""
    try:
        text = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {response.status_code}: {response.text[:200]}"
    return f"{text.rstrip('.')}; {NEED_KEY}" if response.status_code == 401 else text


def call(client: httpx.Client, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    """One request (with ``body`` as JSON); the JSON reply ({} when empty) or ``ServerError``."""
    response = client.request(method, path, json=body)
    if response.is_error:
        raise ServerError(error_text(response))
    return response.json() if response.content else {}


def ndjson(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The objects of a streamed reply; an error status or ``{"error": ...}`` is ``ServerError``."""
    if response.is_error:
        response.read()
        raise ServerError(error_text(response))
    for line in response.iter_lines():
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError:
            raise ServerError(f"Corral sent a line that is not JSON: {line[:200]!r}") from None
        if "error" in message:
            raise ServerError(str(message["error"]))
        yield message


def follow(client: httpx.Client, path: str, body: dict[str, Any], view: ProgressView) -> None:
    """Stream Ollama progress objects from ``path`` into ``view`` until ``success``."""
    status = ""
    with client.stream("POST", path, json={**body, "stream": True}, timeout=LONG) as response:
        for message in ndjson(response):
            view.show(progress_row(message))
            status = message.get("status", "")
    if status != "success":
        raise ServerError("the server closed the stream before it finished; try again")


def chat(client: httpx.Client, request: dict[str, Any], write: Callable[[str], None]) -> str:
    """Stream one answer from ``/api/chat`` through ``write``; the whole answer.

    A KeyboardInterrupt while it streams leaves the ``with`` and so closes the stream.
    """
    parts = []
    with client.stream("POST", "/api/chat", json=request, timeout=LONG) as response:
        for message in ndjson(response):
            text = message.get("message", {}).get("content", "")
            if text:
                write(text)
                parts.append(text)
    return "".join(parts)


def loaded_models(client: httpx.Client) -> set[str]:
    """The names ``/api/ps`` lists, normalized (``x`` is ``x:latest``)."""
    models = call(client, "GET", "/api/ps")["models"]
    return {normalize_name(m.get("name") or m["model"]) for m in models}


# -- blobs ----------------------------------------------------------------------------


def file_digest(path: Path, view: ProgressView) -> str:
    """``sha256:<hex>`` of the file, with a bar while it is read."""
    total, done, sha = path.stat().st_size, 0, hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            sha.update(chunk)
            done += len(chunk)
            view.show(Row(f"hash:{path}", f"hashing {path.name}", total, done))
    return f"sha256:{sha.hexdigest()}"


def upload_blob(client: httpx.Client, path: Path, view: ProgressView) -> str:
    """Make ``path`` a blob on the server (as ``ollama create`` does); its digest."""
    digest = file_digest(path, view)
    present = client.head(f"/api/blobs/{digest}")
    if present.status_code == 200:
        view.show(Row(digest, f"using the server's copy of {short_digest(digest)}"))
        return digest
    if present.status_code != 404:
        raise ServerError(error_text(present))
    total = path.stat().st_size
    label = f"uploading {short_digest(digest)}"

    def chunks() -> Iterator[bytes]:
        done = 0
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk
                done += len(chunk)
                view.show(Row(digest, label, total, done))

    view.show(Row(digest, label, total, 0))
    response = client.post(
        f"/api/blobs/{digest}",
        content=chunks(),
        headers={"Content-Length": str(total)},
        timeout=LONG,
    )
    if response.is_error:
        raise ServerError(error_text(response))
    return digest
