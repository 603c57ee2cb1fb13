"""Tools and thinking over HTTP, with the official clients: the real app, the real engine.

The app (``build_api``) runs under uvicorn over ``LocalBackend`` (the real
``ModelReplica``, no Ray) with three real models: the starter (prompted with the
SmolLM2 tool template Ollama gives it), ``tools:135m`` (the same weights with
Qwen 2.5's template) and ``thinker:135m`` (with DeepSeek-R1's, whose prompt
opens ``<think>``, and no tools). The compat suite runs the same conversations
on the session's Corral on Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime

import anthropic
import ollama
import openai
import pytest

from deployments.api import build_api
from nodes.engine import EngineSpec
from nodes.models import STARTER_MODEL, builtin_models
from tests.support.chat_models import THINKING_MODEL, TOOLS_MODEL
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app
from tests.support.tool_rounds import (
    QUESTION,
    TOOLS,
    anthropic_round_trip,
    ollama_forced_call,
    ollama_round_trip,
    open_webui_bodies,
    openai_round_trip,
    openai_streamed,
    replay,
    responses_round_trip,
)


@pytest.fixture(scope="module")
def url(starter_path, tools_model_path, thinking_model_path) -> Iterator[str]:
    starter = builtin_models()[STARTER_MODEL]
    specs = [
        EngineSpec(model=name, path=str(path), n_ctx=2048, n_threads=2)
        for name, path in (
            (STARTER_MODEL, starter_path),
            (TOOLS_MODEL, tools_model_path),
            (THINKING_MODEL, thinking_model_path),
        )
    ]
    backend = LocalBackend(specs, models=[replace(starter, path=str(starter_path))])
    with serve_app(build_api(backend)) as base:
        yield base


@pytest.fixture(scope="module")
def oai(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(url) -> ollama.Client:
    return ollama.Client(host=url, timeout=120)


@pytest.mark.parametrize("model", [STARTER_MODEL, TOOLS_MODEL])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_tool_round_trip(oai, model, stream):
    openai_round_trip(oai, model, stream=stream)


@pytest.mark.parametrize("model", [STARTER_MODEL, TOOLS_MODEL])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ollama_tool_round_trip(client, http, model, stream):
    ollama_round_trip(client, http, model, stream=stream)


@pytest.mark.parametrize("model", [STARTER_MODEL, TOOLS_MODEL])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_anthropic_tool_round_trip(url, model, stream):
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    anthropic_round_trip(client, model, stream=stream)


@pytest.mark.parametrize("model", [STARTER_MODEL, TOOLS_MODEL])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_responses_tool_round_trip(oai, model, stream):
    responses_round_trip(oai, model, stream=stream)


def test_a_named_function_is_the_one_called(oai):
    r = oai.chat.completions.create(
        model=TOOLS_MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=32,
    )
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_ollama_ids_and_indexes(http):
    message = ollama_forced_call(http, TOOLS_MODEL, stream=False)
    [call] = message.tool_calls
    raw = http.post(
        "/api/chat",
        json={
            "model": TOOLS_MODEL,
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": "required",
            "stream": False,
            "options": {"temperature": 0, "num_predict": 48},
        },
    ).json()
    [wire] = raw["message"]["tool_calls"]
    assert wire["id"].startswith("call_") and wire["function"]["index"] == 0
    assert call.function.name == wire["function"]["name"]


def test_a_model_without_tool_support_says_so_on_both_apis(oai, client, http):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=THINKING_MODEL, messages=QUESTION, tools=TOOLS)
    assert err.value.body["message"] == f"{THINKING_MODEL} does not support tools"
    assert err.value.body["param"] == "tools"
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=THINKING_MODEL, messages=QUESTION, tools=TOOLS)
    assert (
        err.value.status_code == 400
        and err.value.error == f"{THINKING_MODEL} does not support tools"
    )
    # tool_choice "none" shows the model no tools: nothing to refuse
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": THINKING_MODEL,
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": "none",
            "max_tokens": 4,
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["reasoning_content"]


def test_thinking_on_both_apis(oai, client):
    r = oai.chat.completions.create(
        model=THINKING_MODEL, messages=QUESTION, max_tokens=12, temperature=0
    )
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] and "<think>" not in (message.content or "")
    streamed, _ = openai_streamed(
        oai, model=THINKING_MODEL, messages=QUESTION, max_tokens=12, temperature=0
    )
    assert streamed["reasoning_content"] == message.model_extra["reasoning_content"]
    answer = client.chat(
        model=THINKING_MODEL,
        messages=QUESTION,
        think=True,
        options={"temperature": 0, "num_predict": 12},
    )
    assert answer.message.thinking == message.model_extra["reasoning_content"]
    parts = list(
        client.chat(
            model=THINKING_MODEL,
            messages=QUESTION,
            think=True,
            stream=True,
            options={"temperature": 0, "num_predict": 12},
        )
    )
    assert "".join(p.message.thinking or "" for p in parts) == answer.message.thinking
    generated = client.generate(
        model=THINKING_MODEL, prompt="Hi", options={"temperature": 0, "num_predict": 8}
    )
    assert generated.thinking and not generated.response


def test_thinking_a_model_cannot_do_is_refused_as_ollama_refuses_it(oai, client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=STARTER_MODEL, messages=QUESTION, think=True)
    assert (
        err.value.status_code == 400
        and err.value.error == f'"{STARTER_MODEL}" does not support thinking'
    )
    assert client.chat(
        model=STARTER_MODEL, messages=QUESTION, think=False, options={"num_predict": 2}
    ).done
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=STARTER_MODEL, messages=QUESTION, reasoning_effort="high")


def test_show_lists_what_each_template_supports(client):
    assert client.show(STARTER_MODEL).capabilities == ["completion", "tools"]
    assert client.show(TOOLS_MODEL).capabilities == ["completion", "tools"]
    assert client.show(THINKING_MODEL).capabilities == ["completion", "thinking"]


def test_tags_and_ps_give_digests_and_a_busy_model_expires_keep_alive_from_now(client, http):
    starter = next(m for m in client.list().models if m.model == STARTER_MODEL)
    assert len(starter.digest) == 64
    with http.stream(
        "POST",
        "/api/chat",
        json={
            "model": STARTER_MODEL,
            "messages": QUESTION,
            "options": {"num_predict": 200},
            "keep_alive": "10m",
        },
    ) as r:
        next(r.iter_lines())  # the generation runs now
        [running] = [m for m in client.ps().models if m.model == STARTER_MODEL]
        left = running.expires_at.timestamp() - datetime.now().timestamp()
        assert 9 * 60 < left <= 10 * 60 + 5
        assert running.digest == starter.digest


@pytest.mark.parametrize("model", [STARTER_MODEL, TOOLS_MODEL])
def test_open_webui_default_requests_succeed(http, model):
    for name, route, body in open_webui_bodies(model):
        assert replay(http, route, body), name
