"""A fake Corral API for the CLI's unit tests: ``httpx.MockTransport`` routes that record
every request, and ``corral(...)`` to run a command against it through typer's CliRunner.

``fake_corral(monkeypatch)`` replaces ``cluster.api_client.connect`` so that every command
talks to the fake instead of the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from typer.testing import CliRunner

from cluster import api_client
from cluster.cli import app

DIGEST = "sha256:" + "0123456789ab" + "c" * 52
Handler = Callable[[httpx.Request], httpx.Response]


def ndjson(*messages: dict) -> bytes:
    """``messages`` as a streamed Ollama reply: one JSON object a line."""
    return b"".join(json.dumps(m).encode() + b"\n" for m in messages)


def answer(*pieces: str) -> bytes:
    """A streamed /api/chat answer in ``pieces``."""
    lines = [{"message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
    return ndjson(*lines, {"message": {"role": "assistant", "content": ""}, "done": True})


class FakeCorral:
    """Routes (method, path) to canned replies or functions; keeps every request and body."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.seen: list[tuple[str, str, bytes]] = []
        self.urls: list[str] = []  # where the command was told to connect

    def route(self, method: str, path: str, status: int = 200, **reply) -> None:
        self.routes[method, path] = lambda request: httpx.Response(status, **reply)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.read()))
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return httpx.Response(404, json={"error": f"no route {request.url.path}"})
        return handler(request)

    def bodies(self, path: str) -> list:
        return [json.loads(body) for _, p, body in self.seen if p == path and body]

    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _ in self.seen]


def fake_corral(monkeypatch: pytest.MonkeyPatch) -> FakeCorral:
    """A fake that every command's client talks to, with no settings from the environment."""
    fake = FakeCorral()

    def connect(url: str) -> httpx.Client:
        fake.urls.append(url)
        return httpx.Client(base_url=url, transport=httpx.MockTransport(fake))

    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    monkeypatch.setattr(api_client, "connect", connect)
    return fake


def corral(*args: str, input: str | None = None):
    """Run ``corral ARGS --host box.lan:8080`` in-process; typer's result."""
    return CliRunner().invoke(app, [*args, "--host", "box.lan:8080"], input=input)
