"""Tools and thinking with the official ``openai`` and ``ollama`` clients, against the
session's Corral on Ray (real replicas, real engine).

``tools:135m`` and ``thinker:135m`` are the starter model's weights with Qwen 2.5's
and DeepSeek-R1's chat templates, created in Corral from uploaded GGUFs
(``chat_models`` in tests/conftest.py). Open WebUI's recorded requests, tools
included, are replayed against both APIs.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from tests.support.tool_rounds import (
    QUESTION,
    TOOLS,
    ollama_round_trip,
    open_webui_bodies,
    openai_round_trip,
    openai_streamed,
    replay,
)

STARTER = "smollm2:135m"


@pytest.fixture(scope="module")
def client(corral) -> ollama.Client:
    return ollama.Client(host=corral.url, timeout=300)


@pytest.fixture(scope="module")
def http(corral) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=corral.url, timeout=300) as client:
        yield client


@pytest.mark.parametrize("which", ["starter", "qwen2.5-template"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_tool_round_trip(openai_client, chat_models, which, stream):
    model = STARTER if which == "starter" else chat_models[0]
    openai_round_trip(openai_client, model, stream=stream)


@pytest.mark.parametrize("which", ["starter", "qwen2.5-template"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ollama_tool_round_trip(client, http, chat_models, which, stream):
    model = STARTER if which == "starter" else chat_models[0]
    ollama_round_trip(client, http, model, stream=stream)


def test_tools_for_a_model_without_them_are_a_400(openai_client, client, chat_models):
    thinker = chat_models[1]  # DeepSeek-R1's template: thinking, no tools
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=thinker, messages=QUESTION, tools=TOOLS)
    assert err.value.status_code == 400 and "does not support tools" in err.value.message
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=thinker, messages=QUESTION, tools=TOOLS)
    assert err.value.status_code == 400 and err.value.error == f"{thinker} does not support tools"


def test_reasoning_fields(openai_client, client, chat_models):
    thinker = chat_models[1]
    r = openai_client.chat.completions.create(
        model=thinker, messages=QUESTION, max_tokens=12, temperature=0
    )
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning
    streamed, finish = openai_streamed(
        openai_client, model=thinker, messages=QUESTION, max_tokens=12, temperature=0
    )
    assert streamed["reasoning_content"] == reasoning and finish == "length"
    options = {"temperature": 0, "num_predict": 12}
    answer = client.chat(model=thinker, messages=QUESTION, think=True, options=options)
    assert answer.message.thinking == reasoning
    parts = list(client.chat(model=thinker, messages=QUESTION, stream=True, options=options))
    assert "".join(p.message.thinking or "" for p in parts) == reasoning
    assert client.show(thinker).capabilities == ["completion", "thinking"]
    assert client.show(chat_models[0]).capabilities == ["completion", "tools"]
    assert client.show(STARTER).capabilities == ["completion", "tools"]


def test_tags_and_ps_carry_digests(client, chat_models):
    listed = {m.model: m.digest for m in client.list().models}
    assert len(listed[STARTER]) == 64 and len(listed[chat_models[0]]) == 64
    client.generate(model=STARTER, prompt="Hi", options={"num_predict": 2})
    running = {m.model: m.digest for m in client.ps().models}
    assert running[STARTER] == listed[STARTER]


@pytest.mark.parametrize("which", ["starter", "qwen2.5-template"])
def test_open_webui_default_requests_succeed_on_both_apis(http, chat_models, which):
    model = STARTER if which == "starter" else chat_models[0]
    for name, route, body in open_webui_bodies(model):
        assert replay(http, route, body), name
