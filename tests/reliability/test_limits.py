"""Bodies over the size limit are refused with 413 in each API's shape, and nothing breaks.

The real app over the fake engine, with a 4 KiB limit so that the tests send
little: a declared Content-Length over the limit is refused before the body
is read; a chunked body (no length) is read up to the limit and refused
there; a body just under the limit is served; model uploads are not limited.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from deployments.api import DEFAULT_MAX_BODY, build_api
from nodes.engine import EngineSpec
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app

LIMIT = 4096
MODEL = "fake:a"


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    backend = LocalBackend(
        [EngineSpec(model=MODEL, path="", engine="fake", options={"token_delay": 0})],
        blob_dir=tmp_path_factory.mktemp("blobs"),
    )
    with serve_app(build_api(backend, max_body=LIMIT)) as base:
        yield base


def chat_body(size: int) -> bytes:
    """An OpenAI chat request of exactly ``size`` bytes."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 2}
    padding = size - len(json.dumps(body).encode())
    body["messages"][0]["content"] = "x" * padding
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


def chunked(data: bytes, piece: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
@pytest.mark.parametrize("how", ["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_in_the_routes_shape(url, path, how):
    data = chat_body(LIMIT + 1)
    content = data if how == "content-length" else chunked(data)
    response = httpx.post(f"{url}{path}", content=content)
    assert response.status_code == 413, response.text
    body = response.json()
    message = body["error"] if path.startswith("/api/") else body["error"]["message"]
    assert "larger than this server takes (4,096 bytes)" in message and "max_body" in message
    if not path.startswith("/api/"):
        assert body["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("how", ["content-length", "chunked"])
def test_a_body_at_the_limit_is_served(url, how):
    data = chat_body(LIMIT)
    content = data if how == "content-length" else chunked(data)
    response = httpx.post(f"{url}/v1/chat/completions", content=content)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_a_huge_declared_length_is_refused_unread(url):
    """A client announcing 10 GB gets its 413 without sending a byte of it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10737418240\r\n\r\n"
        )
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413 "), head


def test_model_uploads_are_not_limited(url):
    data = b"G" * (LIMIT * 8)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{url}/api/blobs/{digest}", content=data).status_code == 201
    assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 200


def test_the_server_keeps_serving_after_refusals(url):
    for _ in range(20):
        assert httpx.post(f"{url}/api/chat", content=chat_body(LIMIT * 4)).status_code == 413
    ok = httpx.post(f"{url}/v1/chat/completions", content=chat_body(200))
    assert ok.status_code == 200


def test_the_default_limit_takes_a_long_prompt():
    """32 MiB: a million-token prompt is about 4 MB of JSON."""
    assert DEFAULT_MAX_BODY == 32 * 1024**2
