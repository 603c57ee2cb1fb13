"""Anthropic's Messages API: request conversion, the streamed event sequence, error shapes.

Conversion and streaming are checked as pure functions (engine events in, Anthropic
events out); the HTTP tests serve the real app over in-process replicas with the
fake engine (``LocalBackend``), as tests/unit/test_openai_protocol.py does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from deployments.anthropic import protocol as p
from deployments.anthropic.serving import StreamedMessage, count_to_engine, messages_to_engine
from deployments.api import build_api
from nodes.chat_output.calls import ToolCall, ToolChoice
from nodes.engine import (
    IMAGE_MARKER,
    ChatMessage,
    EngineSpec,
    Finished,
    TextDelta,
    ThinkingDelta,
    Timings,
    ToolCallEvent,
    Usage,
)
from nodes.errors import InvalidRequest
from tests.support.local_backend import LocalBackend

PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def req(**fields) -> p.MessagesRequest:
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return p.MessagesRequest.model_validate(body | fields)


def finished(reason: str = "stop", prompt: int = 5, completion: int = 3) -> Finished:
    return Finished(reason, Usage(prompt, completion), Timings())  # type: ignore[arg-type]


# -- request conversion ---------------------------------------------------------------------


def test_sampling_fields_and_system_blocks_reach_the_engine():
    greq = messages_to_engine(
        req(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            temperature=0.2,
            top_p=0.9,
            top_k=20,
            stop_sequences=["END"],
            max_tokens=64,
        )
    )
    params = greq.params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (64, 0.2, 0.9, 20)
    assert params.stop == ("END",)
    assert greq.messages == (
        ChatMessage("system", "Be brief.\nBe kind."),
        ChatMessage("user", "hi"),
    )


def test_a_tool_round_trip_becomes_calls_and_tool_turns():
    greq = messages_to_engine(
        req(
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Use the tool.", "signature": "x"},
                        {"type": "text", "text": "Let me look."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {"type": "text", "text": "And now?"},
                    ],
                },
            ],
        )
    )
    assert [t.name for t in greq.tools] == ["get_weather"]
    assert greq.tools[0].parameters == WEATHER["input_schema"]
    assert greq.tool_choice == ToolChoice("required", "get_weather")
    _, assistant, result, user = greq.messages
    assert assistant.tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "toolu_1"),)
    assert (assistant.content, assistant.thinking) == ("Let me look.", "Use the tool.")
    assert result == ChatMessage("tool", "sunny", tool_call_id="toolu_1", tool_name="get_weather")
    assert user == ChatMessage("user", "And now?")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, ToolChoice("auto")),
        ({"type": "any"}, ToolChoice("required")),
        ({"type": "none"}, ToolChoice("none")),
    ],
)
def test_tool_choices(choice, expected):
    assert messages_to_engine(req(tools=[WEATHER], tool_choice=choice)).tool_choice == expected


@pytest.mark.parametrize(
    ("thinking", "think"),
    [
        (None, None),
        ({"type": "enabled", "budget_tokens": 2048}, True),
        ({"type": "disabled"}, False),
        ({"type": "adaptive"}, None),
    ],
)
def test_thinking_turns_the_models_thinking_on_or_off(thinking, think):
    assert messages_to_engine(req(thinking=thinking)).think == think


def test_output_config_effort_is_a_thinking_level():
    assert messages_to_engine(req(output_config={"effort": "low"})).think == "low"
    assert messages_to_engine(req(output_config={"effort": "max"})).think == "high"
    both = req(output_config={"effort": "low"}, thinking={"type": "disabled"})
    assert messages_to_engine(both).think is False


def test_base64_images_stand_where_their_block_is():
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
    }
    content = [{"type": "text", "text": "What is this?"}, image]
    greq = messages_to_engine(req(messages=[{"role": "user", "content": content}]))
    [turn] = greq.messages
    assert turn.content == f"What is this?\n{IMAGE_MARKER}" and len(turn.images) == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": [{**WEATHER, "input_schema": []}]}, "tools.0.input_schema"),
        ({"tools": [{**WEATHER, "name": ""}]}, "tools.0.name"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}},
            "tool_choice.name",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"stop_sequences": ["x"] * 17}, "stop_sequences"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
                        ],
                    }
                ]
            },
            "messages.0.content.0.source.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}],
                    }
                ]
            },
            "messages.0.content.0.input",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document"}]}]},
            "messages.0.content.0.type",
        ),
    ],
)
def test_what_corral_cannot_do_is_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        messages_to_engine(req(**fields))
    assert err.value.param == param


def test_a_token_count_runs_for_no_tokens():
    count = p.CountTokensRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "system": "s"}
    )
    greq = count_to_engine(count)
    assert greq.params.max_tokens == 0 and len(greq.messages) == 2


# -- the streamed events ----------------------------------------------------------------------


def test_a_stream_is_anthropics_event_sequence():
    message = StreamedMessage("msg_1", "m")
    events = message.start()
    events += message.events([ThinkingDelta("Hm"), ThinkingDelta("m."), TextDelta("Hi")])
    events += message.events(
        [
            TextDelta(" there"),
            ToolCallEvent(0, ToolCall("f", {"a": 1}, "call_1")),
            finished(),
        ]
    )
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    assert events[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[3]["delta"] == {"type": "thinking_delta", "thinking": "Hmm."}
    assert [e["index"] for e in events[2:12]] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert events[7]["delta"] == {"type": "text_delta", "text": " there"}
    assert events[9]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "f",
        "input": {},
    }
    assert events[10]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    assert events[12]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[12]["usage"] == {"input_tokens": 5, "output_tokens": 3}


def test_a_stream_cut_by_max_tokens_and_an_empty_one():
    message = StreamedMessage("msg_1", "m")
    events = message.events([TextDelta("a"), finished("length")])
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    empty = StreamedMessage("msg_2", "m").events([finished()])
    assert [e["type"] for e in empty] == [
        "content_block_start",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


# -- over HTTP, with the fake engine -------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    fake = {"token_delay": 0, "reply_tokens": 6}
    backend = LocalBackend(
        [
            EngineSpec(model="fake:1", path="", engine="fake", options=fake),
            EngineSpec(
                model="fake:broken", path="", engine="fake", options={**fake, "fail_after": 2}
            ),
        ]
    )
    with TestClient(build_api(backend)) as c:
        yield c


def sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_a_message_over_http(client):
    body = {"model": "fake:1", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    answer = client.post("/v1/messages", json=body).json()
    assert answer["type"] == "message" and answer["id"].startswith("msg_")
    assert answer["role"] == "assistant" and answer["model"] == "fake:1"
    assert answer["content"][0]["type"] == "text" and len(answer["content"][0]["text"].split()) == 4
    assert answer["stop_reason"] == "max_tokens"
    assert answer["usage"] == {"input_tokens": 2, "output_tokens": 4}
    done = client.post("/v1/messages", json=body | {"max_tokens": 100}).json()
    assert done["stop_reason"] == "end_turn"


def test_a_stream_over_http(client):
    body = {
        "model": "fake:1",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = client.post("/v1/messages", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert len(text.split()) == 6
    assert events[-2][1]["usage"] == {"input_tokens": 2, "output_tokens": 6}


def test_a_stream_that_fails_ends_with_one_error_event(client):
    body = {
        "model": "fake:broken",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    events = sse(client.post("/v1/messages", json=body).text)
    name, data = events[-1]
    assert name == "error" and [n for n, _ in events].count("error") == 1
    assert data["type"] == "error" and data["error"]["type"] == "api_error"


def test_count_tokens_over_http(client):
    body = {"model": "fake:1", "messages": [{"role": "user", "content": "one two three"}]}
    assert client.post("/v1/messages/count_tokens", json=body).json() == {"input_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (
            {"model": "fake:1", "messages": [{"role": "user", "content": "hi"}]},
            400,
            "invalid_request_error",
        ),
        (
            {"model": "ghost:1", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            404,
            "not_found_error",
        ),
        ({"model": "fake:1", "max_tokens": 4, "messages": []}, 400, "invalid_request_error"),
        (
            {"model": "fake:1", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
            400,
            "invalid_request_error",
        ),
    ],
)
def test_errors_are_in_anthropics_shape(client, body, status, kind):
    response = client.post("/v1/messages", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"type", "error", "request_id"} and error["type"] == "error"
    assert error["error"]["type"] == kind and error["error"]["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_a_body_that_is_not_an_object_is_400_in_anthropics_shape(client):
    response = client.post("/v1/messages/count_tokens", content=b"[]")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_stop_sequence_is_named_as_the_reason(client):
    # The fake engine's words are separated by spaces: a space ends the text at once.
    body = {
        "model": "fake:1",
        "max_tokens": 50,
        "stop_sequences": [" "],
        "messages": [{"role": "user", "content": "hi"}],
    }
    answer = client.post("/v1/messages", json=body).json()
    assert answer["stop_reason"] == "stop_sequence" and answer["stop_sequence"] == " "
    assert len(answer["content"][0]["text"].split()) == 1
