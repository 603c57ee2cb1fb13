"""Reaching Corral's API from the CLI (``cluster/api_client.py``): where it is, the key it
sends, and what a command says when the server cannot be reached or answers nonsense."""

from __future__ import annotations

import httpx
import pytest

from cluster.api_client import api_url, connect, error_text
from tests.support.fake_corral import FakeCorral, corral, fake_corral


@pytest.fixture
def server(monkeypatch) -> FakeCorral:
    return fake_corral(monkeypatch)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),  # listening everywhere: ask locally
        ("box.lan", "http://box.lan:11434"),
        ("[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_api_url(host, url):
    assert api_url(host) == url


def test_the_model_commands_send_corral_api_key(monkeypatch):
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    assert "authorization" not in connect("http://box:1").headers
    monkeypatch.setenv("CORRAL_API_KEY", "corral-abc")
    assert connect("http://box:1").headers["authorization"] == "Bearer corral-abc"
    refused = httpx.Response(401, json={"error": "The API key is not valid."})
    assert error_text(refused) == (
        "The API key is not valid; set CORRAL_API_KEY to a key made by `corral keys create` "
        "on the head"
    )


def test_an_unreachable_server_says_to_start_corral(server):
    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    server.routes["GET", "/api/tags"] = refuse
    result = corral("list")
    assert result.exit_code == 1
    assert "cannot reach Corral at http://box.lan:8080 ([Errno 111] Connection refused)" in (
        result.stderr
    )
    assert "corral serve" in result.stderr


def test_a_connection_lost_midway_is_not_called_unreachable(server):
    def drop(request):
        raise httpx.RemoteProtocolError("peer closed connection")

    server.routes["POST", "/api/pull"] = drop
    result = corral("pull", "x")
    assert result.exit_code == 1
    assert "lost the connection to Corral at http://box.lan:8080 (peer closed" in result.stderr


def test_a_reply_that_is_not_ndjson_is_an_error(server):
    server.route("POST", "/api/pull", content=b"<html>\n")
    result = corral("pull", "x")
    assert result.exit_code == 1
    assert "not JSON: '<html>'" in result.stderr
