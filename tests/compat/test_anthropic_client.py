"""The official ``anthropic`` Python client against the session's Corral on Ray (real
replicas, real engine): a message, a stream, a tool round trip, thinking, token counts,
and the errors the client raises.

``tools:135m`` and ``thinker:135m`` are the starter model's weights with Qwen 2.5's and
DeepSeek-R1's chat templates (``chat_models`` in tests/conftest.py).
"""

from __future__ import annotations

import anthropic
import pytest

from tests.support.tool_rounds import (
    ANTHROPIC_TOOLS,
    GREEDY_BODY,
    QUESTION,
    anthropic_round_trip,
)

STARTER = "smollm2:135m"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = "You answer in one short sentence."


@pytest.fixture(scope="module")
def client(corral) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=corral.url, api_key="unused", max_retries=0, timeout=120)


def test_a_message(client):
    m = client.messages.create(
        model=STARTER, system=SYSTEM, messages=MESSAGES, max_tokens=32, extra_body=GREEDY_BODY
    )
    assert m.type == "message" and m.role == "assistant" and m.model == STARTER
    assert m.id.startswith("msg_") and m.stop_reason == "end_turn"
    [block] = m.content
    assert block.type == "text" and "Paris" in block.text
    assert m.usage.input_tokens > 20 and 0 < m.usage.output_tokens < 32


def test_a_stream_gives_the_same_message(client):
    ask = {"model": STARTER, "system": SYSTEM, "messages": MESSAGES, "extra_body": GREEDY_BODY}
    whole = client.messages.create(max_tokens=32, **ask)
    with client.messages.stream(max_tokens=32, **ask) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "end_turn" and final.usage == whole.usage
    short = client.messages.create(max_tokens=3, **ask)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


@pytest.mark.parametrize("which", ["starter", "qwen2.5-template"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_round_trip(client, chat_models, which, stream):
    anthropic_round_trip(client, STARTER if which == "starter" else chat_models[0], stream=stream)


def test_thinking_comes_as_thinking_blocks(client, chat_models):
    thinker = chat_models[1]
    ask = {
        "model": thinker,
        "messages": QUESTION,
        "max_tokens": 12,
        "extra_body": GREEDY_BODY,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    m = client.messages.create(**ask)
    assert m.content[0].type == "thinking" and m.content[0].thinking
    assert "<think>" not in m.content[0].thinking
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == m.content[0].thinking
    # A model that cannot think answers anyway, as Ollama relaxes it for Claude Code.
    plain = client.messages.create(**{**ask, "model": STARTER})
    assert [b.type for b in plain.content] == ["text"]


def test_count_tokens(client):
    count = client.messages.count_tokens(model=STARTER, system=SYSTEM, messages=MESSAGES)
    m = client.messages.create(
        model=STARTER, system=SYSTEM, messages=MESSAGES, max_tokens=1, extra_body=GREEDY_BODY
    )
    assert count.input_tokens == m.usage.input_tokens > 20
    more = client.messages.count_tokens(model=STARTER, messages=MESSAGES, tools=ANTHROPIC_TOOLS)
    assert more.input_tokens > count.input_tokens - 10


def test_errors(client):
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="ghost:7b", messages=MESSAGES, max_tokens=4)
    assert err.value.body["error"]["type"] == "not_found_error"
    assert "ghost:7b" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(
            model=STARTER, messages=[{"role": "user", "content": []}], max_tokens=0
        )
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    # the request's id (Corral's x-request-id header) rides in the body, as Anthropic's does
    assert err.value.body["request_id"] == err.value.response.headers["x-request-id"]
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(
            model=STARTER,
            messages=MESSAGES,
            max_tokens=4,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "server tools" in err.value.body["error"]["message"]
