"""Huge token counts and context sizes are clamped to what the replica has, or refused
with a reason; none reaches llama.cpp as a number it cannot take.

The real engine on the starter model with a 256-token context, in process
(``LocalBackend``), through the app over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from deployments.api import build_api
from nodes.engine import EngineSpec
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app

MODEL = "tiny:ctx256"
N_CTX = 256
ASK = "Count from one to a thousand, in words."


@pytest.fixture(scope="module")
def http(starter_path) -> Iterator[httpx.Client]:
    backend = LocalBackend(
        [EngineSpec(model=MODEL, path=str(starter_path), n_ctx=N_CTX, n_threads=2)]
    )
    with serve_app(build_api(backend)) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.mark.parametrize("max_tokens", [10**6, 2**63, 2**80])
def test_openai_max_tokens_beyond_the_context_stops_at_its_end(http, max_tokens):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": ASK}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["choices"][0]["finish_reason"] in ("length", "stop")
    assert done["usage"]["total_tokens"] <= N_CTX


@pytest.mark.parametrize(
    "options",
    [
        {"num_predict": 10**12},
        {"num_predict": 2**80, "num_ctx": 2**80},
        {"num_ctx": 10**9, "num_predict": 8},
        {"num_predict": -1, "num_ctx": 64},  # Ollama's "no limit", inside a small window
    ],
)
def test_ollama_num_predict_and_num_ctx_are_clamped(http, options):
    body = {"model": MODEL, "prompt": ASK, "stream": False, "options": options}
    response = http.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    done = response.json()
    window = min(N_CTX, options.get("num_ctx", N_CTX))
    assert done["done_reason"] in ("length", "stop")
    assert done["prompt_eval_count"] + done["eval_count"] <= window


@pytest.mark.parametrize("num_ctx", [0, -5])
def test_ollama_num_ctx_below_one_is_refused_naming_it(http, num_ctx):
    body = {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_ctx": num_ctx}}
    response = http.post("/api/generate", json=body)
    assert response.status_code == 400, response.text
    assert "num_ctx" in response.json()["error"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("max_tokens", -1), ("temperature", 1e308), ("n", 10**6)],
)
def test_openai_out_of_range_values_are_400_naming_the_field(http, field, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], field: value}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("max_tokens", [10**6, 2**63])
def test_anthropic_max_tokens_beyond_the_context_stops_at_its_end(http, max_tokens):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": ASK}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["stop_reason"] in ("max_tokens", "end_turn")
    assert done["usage"]["input_tokens"] + done["usage"]["output_tokens"] <= N_CTX


@pytest.mark.parametrize("max_output_tokens", [10**6, 2**63])
def test_responses_max_output_tokens_beyond_the_context_stops_at_its_end(http, max_output_tokens):
    body = {"model": MODEL, "input": ASK, "max_output_tokens": max_output_tokens}
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] <= N_CTX


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/messages", {"max_tokens": 0}, "max_tokens"),
        ("/v1/messages", {"max_tokens": 8, "temperature": 1e308}, "temperature"),
        ("/v1/messages", {"max_tokens": 8, "top_k": 10**30}, None),
        ("/v1/responses", {"max_output_tokens": 0}, "max_output_tokens"),
        ("/v1/responses", {"temperature": 1e308}, "temperature"),
    ],
)
def test_new_apis_refuse_out_of_range_values(http, path, body, field):
    turn = {"messages": [{"role": "user", "content": "Hi"}]} if path == "/v1/messages" else {}
    base = {"model": MODEL, **turn} if turn else {"model": MODEL, "input": "Hi"}
    response = http.post(path, json={**base, **body})
    if field is None:  # a count beyond any vocabulary: every candidate
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert field in response.text
