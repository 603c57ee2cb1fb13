"""Every response carries an ``x-request-id``, and the log lines of that request carry it too."""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from deployments.api import build_api
from deployments.auth import Keyring
from deployments.keys import KeyFile, keys_path
from nodes.engine import EngineSpec
from nodes.logs import setup_logging
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app

MODEL = "fake:a"


class BrokenListing(LocalBackend):
    """A backend whose listing fails unexpectedly: the app's last-resort 500."""

    async def list_models(self):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def backend() -> LocalBackend:
    return LocalBackend([EngineSpec(model=MODEL, path="", engine="fake", options={})])


@pytest.fixture(scope="module")
def url(backend) -> Iterator[str]:
    with serve_app(build_api(backend)) as base:
        yield base


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What the ``corral`` loggers print, at debug level, in Corral's own format."""
    setup_logging("debug")
    logger = logging.getLogger("corral")
    ours = next(h for h in logger.handlers if getattr(h, "_corral", False))
    stream = io.StringIO()
    old = ours.setStream(stream)
    try:
        yield stream
    finally:
        ours.setStream(old)
        logger.setLevel(logging.INFO)


def rid(response: httpx.Response) -> str:
    value = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", value), value
    return value


def test_every_kind_of_response_has_an_id(url):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    responses = [
        httpx.get(f"{url}/"),
        httpx.get(f"{url}/v1/models"),
        httpx.post(f"{url}/v1/chat/completions", json=chat),
        httpx.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}),
        httpx.post(f"{url}/api/chat", json={"model": "nope", "messages": []}),  # 404
        httpx.post(f"{url}/api/chat", content=b"{not json"),  # 400
        httpx.get(f"{url}/no/such/route"),  # 404 from the router
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 400, 404]
    ids = [rid(r) for r in responses]
    assert len(set(ids)) == len(ids)


def test_an_unexpected_error_is_a_500_with_an_id_in_the_routes_shape(log_lines):
    broken = BrokenListing([EngineSpec(model=MODEL, path="", engine="fake", options={})])
    with serve_app(build_api(broken)) as url:
        openai = httpx.get(f"{url}/v1/models")
        ollama = httpx.get(f"{url}/api/tags")
    assert openai.status_code == ollama.status_code == 500
    assert openai.json()["error"]["type"] == "server_error"
    assert "boom" not in openai.text and "boom" not in ollama.text  # no internals
    assert isinstance(ollama.json()["error"], str)
    logged = log_lines.getvalue()
    assert f"[req={rid(openai)}] unexpected error" in logged
    assert f"[req={rid(ollama)}] unexpected error" in logged


def test_a_401_has_an_id(backend, tmp_path):
    KeyFile(keys_path(tmp_path)).create("k")
    with serve_app(build_api(backend, keyring=Keyring(keys_path(tmp_path)))) as url:
        response = httpx.get(f"{url}/api/tags")
    assert response.status_code == 401 and rid(response)


def test_a_clients_own_id_is_kept_when_sane(url):
    kept = httpx.get(f"{url}/api/version", headers={"x-request-id": "trace-42.a_b:c"})
    assert kept.headers["x-request-id"] == "trace-42.a_b:c"
    for bad in ("x" * 65, "has space", "new\\nline", "ünï"):
        response = httpx.get(f"{url}/api/version", headers={"x-request-id": bad.encode()})
        assert rid(response) != bad


def test_the_access_log_line_carries_the_id(url, log_lines):
    response = httpx.get(f"{url}/api/tags")
    # The server writes the line once the response is out: on a busy box, after the client
    # has it. Wait for it (bounded) rather than read the log at once.
    deadline = time.monotonic() + 10
    while not (lines := [x for x in log_lines.getvalue().splitlines() if "GET /api/tags" in x]):
        assert time.monotonic() < deadline, "no access log line for GET /api/tags"
        time.sleep(0.01)
    line = lines[0]
    assert f"[req={rid(response)}]" in line and " 200 " in line
