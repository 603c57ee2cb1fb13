"""OpenAI's Responses API: input conversion, the typed stream events, errors.

As tests/unit/test_openai_protocol.py: pure conversion, then the real app over
in-process replicas with the fake engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from deployments.api import build_api
from deployments.responses import protocol as p
from deployments.responses.serving import ResponseHead, StreamedResponse, responses_to_engine
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
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def req(**fields) -> p.ResponsesRequest:
    return p.ResponsesRequest.model_validate({"model": "m", "input": "hi"} | fields)


def finished(reason: str = "stop") -> Finished:
    return Finished(reason, Usage(5, 3), Timings())  # type: ignore[arg-type]


def test_a_string_input_with_instructions_and_settings():
    greq = responses_to_engine(
        req(
            instructions="Be brief.",
            max_output_tokens=32,
            temperature=0.1,
            top_p=0.5,
            text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            reasoning={"effort": "high"},
            store=True,
        )
    )
    assert greq.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "hi"))
    assert (greq.params.max_tokens, greq.params.temperature, greq.params.top_p) == (32, 0.1, 0.5)
    assert greq.params.json_schema == {"type": "object"} and greq.think == "high"
    assert responses_to_engine(req(text={"format": {"type": "json_object"}})).params.json_mode


def test_items_of_a_function_call_round_trip():
    greq = responses_to_engine(
        req(
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            input=[
                {"role": "developer", "content": "Use tools."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Weather here?"},
                        {"type": "input_image", "image_url": f"data:image/png;base64,{PIXEL}"},
                    ],
                },
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "Call it."}],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": '{"city": "Paris"}',
                },
                {
                    "type": "function_call",
                    "call_id": "c2",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
        )
    )
    assert greq.tool_choice == ToolChoice("required", "get_weather")
    system, user, assistant, tool = greq.messages
    assert system == ChatMessage("system", "Use tools.")
    assert user.content == f"Weather here?\n{IMAGE_MARKER}" and len(user.images) == 1
    assert assistant.thinking == "Call it." and assistant.tool_calls == (
        ToolCall("get_weather", {"city": "Paris"}, "c1"),
        ToolCall("get_weather", {}, "c2"),
    )
    assert tool == ChatMessage("tool", "sunny", tool_call_id="c1", tool_name="get_weather")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{**WEATHER, "parameters": []}]}, "tools.0.parameters"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input.0.type"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}
                ]
            },
            "input.0.content.0.image_url",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input.0.content.0.type",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
            "input.0.arguments",
        ),
    ],
)
def test_what_corral_cannot_do_is_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        responses_to_engine(req(**fields))
    assert err.value.param == param


def test_a_stream_is_openais_typed_event_sequence():
    stream = StreamedResponse(ResponseHead("resp_1", 0, req()))
    events = stream.start()
    events += stream.events([ThinkingDelta("Hm."), TextDelta("Hi")])
    events += stream.events([ToolCallEvent(0, ToolCall("f", {"a": 1}, "c1")), finished()])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e.get("output_index") for e in events[2:18]] == [0] * 6 + [1] * 6 + [2] * 4
    assert events[15]["delta"] == '{"a": 1}' and events[14]["item"]["arguments"] == ""
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["total_tokens"] == 8
    assert [item["type"] for item in done["output"]] == ["reasoning", "message", "function_call"]
    assert done["output"][1]["content"][0]["text"] == "Hi"
    assert done["output"][2]["call_id"] == "c1"


def test_a_stream_cut_by_max_output_tokens_is_incomplete():
    stream = StreamedResponse(ResponseHead("resp_1", 0, req()))
    last = stream.events([TextDelta("a"), finished("length")])[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"


# -- over HTTP, with the fake engine ---------------------------------------------------------------


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


def sse(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_a_response_over_http(client):
    answer = client.post("/v1/responses", json={"model": "fake:1", "input": "hi"}).json()
    assert answer["object"] == "response" and answer["id"].startswith("resp_")
    assert answer["status"] == "completed" and answer["store"] is False
    [message] = answer["output"]
    assert message["type"] == "message" and len(message["content"][0]["text"].split()) == 6
    assert answer["usage"]["input_tokens"] == 2 and answer["usage"]["output_tokens"] == 6


def test_a_stream_over_http_and_one_that_fails(client):
    body = {"model": "fake:1", "input": "hi", "stream": True, "max_output_tokens": 3}
    events = sse(client.post("/v1/responses", json=body).text)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.incomplete"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert len(text.split()) == 3
    broken = sse(client.post("/v1/responses", json=body | {"model": "fake:broken"}).text)
    assert [e["type"] for e in broken[-2:]] == ["error", "response.failed"]
    assert broken[-2]["message"] and broken[-1]["response"]["status"] == "failed"


def test_errors_are_in_openais_shape(client):
    response = client.post("/v1/responses", json={"model": "ghost:1", "input": "hi"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = client.post(
        "/v1/responses", json={"model": "fake:1", "input": "hi", "previous_response_id": "r"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "previous_response_id"
