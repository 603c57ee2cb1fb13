"""OpenAI protocol: request conversion, error mapping, and the HTTP shapes.

The HTTP tests serve the real app (``build_api``) over in-process replicas
(``LocalBackend``: the real ``ModelReplica`` class, no Ray) with the fake
engine, so they check wire formats quickly; the integration suite checks the
same routes end to end on Ray with the real model.
"""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from ray.exceptions import RayTaskError

from deployments.api import build_api
from deployments.errors import classify, openai_body
from deployments.openai import protocol as p
from deployments.openai.serving import (
    _ChatChunks,
    chat_to_engine,
    completion_to_engine,
    embedding_inputs,
)
from nodes.chat_output.calls import ToolCall, ToolChoice
from nodes.engine import (
    ChatMessage,
    EngineSpec,
    Finished,
    TextDelta,
    ThinkingDelta,
    Timings,
    ToolCallEvent,
    Usage,
)
from nodes.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from tests.support.local_backend import LocalBackend


def chat_req(**fields) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return p.ChatCompletionRequest.model_validate(body)


# -- request conversion -------------------------------------------------------------------


def test_chat_request_maps_every_sampling_field():
    greq = chat_req(
        max_tokens=50,
        temperature=0.3,
        top_p=0.9,
        top_k=20,
        min_p=0.1,
        seed=7,
        stop="END",
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repeat_penalty=1.1,
    ).model_copy()
    params = chat_to_engine(greq).params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (50, 0.3, 0.9, 20)
    assert (params.min_p, params.seed, params.stop) == (0.1, 7, ("END",))
    assert (params.presence_penalty, params.frequency_penalty, params.repeat_penalty) == (
        0.5,
        0.25,
        1.1,
    )


def test_unset_fields_keep_llama_cpp_defaults_and_max_completion_tokens_wins():
    params = chat_to_engine(chat_req(max_tokens=5, max_completion_tokens=9)).params
    assert params.max_tokens == 9
    defaults = chat_to_engine(chat_req()).params
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.8, 40, None)


def test_messages_become_text_turns():
    greq = chat_to_engine(
        chat_req(
            messages=[
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ]
        )
    )
    assert greq.messages == (
        ChatMessage("system", "be brief"),
        ChatMessage("user", "a\nb"),
        ChatMessage("assistant", ""),
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools.0.function.parameters",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
    ],
)
def test_what_corral_cannot_do_is_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        chat_to_engine(chat_req(**fields))
    assert err.value.param == param


def test_response_format_selects_json_mode_or_a_schema():
    assert chat_to_engine(chat_req(response_format={"type": "json_object"})).params.json_mode
    schema = {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert chat_to_engine(chat_req(response_format=fmt)).params.json_schema == schema


def test_unknown_fields_are_accepted_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="corral.openai"):
        chat_to_engine(chat_req(logit_bias={}, store=True))
    assert "logit_bias, store" in caplog.text


def test_completion_request_takes_one_prompt_and_openais_default_length():
    req = p.CompletionRequest.model_validate({"model": "m", "prompt": ["once upon"]})
    greq = completion_to_engine(req)
    assert greq.prompt == "once upon" and greq.params.max_tokens == 16
    for bad, param in [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "suffix": "z"}, "suffix"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            completion_to_engine(p.CompletionRequest.model_validate({"model": "m", **bad}))
        assert err.value.param == param


@pytest.mark.parametrize(
    ("input_", "param"),
    [([], "input"), ([1, 2, 3], "input"), (["ok", ""], "input.1")],
)
def test_embedding_inputs_refuse_empty_and_token_input(input_, param):
    with pytest.raises(InvalidRequest) as err:
        embedding_inputs(p.EmbeddingRequest(model="m", input=input_))
    assert err.value.param == param
    assert embedding_inputs(p.EmbeddingRequest(model="m", input="one")) == ["one"]


# -- error mapping --------------------------------------------------------------------------


def test_errors_map_to_openai_status_type_and_code():
    nf = classify(ModelNotFound("ghost"))
    assert (nf.status, nf.code, nf.param) == (404, "model_not_found", "model")
    cl = classify(ContextLengthExceeded(9000, 4096, param="messages"))
    assert (cl.status, cl.type, cl.code) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
    )
    assert openai_body(cl)["error"]["param"] == "messages"


def test_errors_from_other_processes_are_unwrapped():
    wrapped = RayTaskError("ensure", "traceback...", ModelNotFound("ghost"))
    assert classify(wrapped).code == "model_not_found"


def test_validation_errors_name_the_field():
    with pytest.raises(ValidationError) as err:
        p.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "robot"}]})
    error = classify(err.value)
    assert error.status == 400 and error.param == "messages.0.role"


def test_a_lone_surrogate_anywhere_is_refused_naming_the_field():
    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "a \\ud800"}]}')
    with pytest.raises(InvalidRequest) as err:
        p.ChatCompletionRequest.model_validate(body)
    assert err.value.param == "messages.0.content" and "surrogate" in err.value.message


def test_unexpected_errors_are_500_without_internals():
    error = classify(KeyError("/secret/path"))
    assert error.status == 500 and "secret" not in error.message


# -- HTTP shapes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    backend = LocalBackend(
        [
            EngineSpec(
                model="fake:1", path="", n_ctx=64, engine="fake", options={"token_delay": 0}
            ),
            EngineSpec(
                model="fake:broken",
                path="",
                engine="fake",
                options={"token_delay": 0, "fail_after": 3},
            ),
        ]
    )
    with TestClient(build_api(backend), raise_server_exceptions=False) as c:
        yield c


def sse_events(response) -> list[str]:
    return [
        line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
    ]


def test_health_check(client):
    assert client.get("/").text == "Corral is running"
    assert client.head("/").status_code == 200


def test_chat_completion_shape(client):
    body = client.post(
        "/v1/chat/completions",
        json={"model": "fake:1", "messages": [{"role": "user", "content": "hi"}]},
    ).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == 2 + 16


def test_chat_stream_is_role_then_content_then_finish_usage_and_done(client):
    req = {
        "model": "fake:1",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len("".join(content).split()) == 4
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1


def test_a_stream_that_fails_ends_with_one_error_event(client):
    req = {"model": "fake:broken", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200
        events = sse_events(r)
    errors = [e for e in events if '"error"' in e]
    assert len(errors) == 1 and events[-1] == errors[0]  # no [DONE] after it
    error = json.loads(errors[0])["error"]
    assert error["type"] == "server_error" and "fault" not in error["message"]


def test_completion_and_echo(client):
    body = client.post(
        "/v1/completions", json={"model": "fake:1", "prompt": "one two", "echo": True}
    ).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith("one two")
    assert body["usage"]["completion_tokens"] == 16


def test_completion_stream(client):
    req = {"model": "fake:1", "prompt": "one two", "stream": True, "max_tokens": 3}
    with client.stream("POST", "/v1/completions", json=req) as r:
        events = sse_events(r)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_as_floats_and_base64(client):
    body = client.post("/v1/embeddings", json={"model": "fake:1", "input": ["a", "b"]}).json()
    assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 16
    b64 = client.post(
        "/v1/embeddings", json={"model": "fake:1", "input": "a", "encoding_format": "base64"}
    ).json()
    assert isinstance(b64["data"][0]["embedding"], str)


def test_models_list_and_get(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["fake:1", "fake:broken"]
    assert client.get("/v1/models/fake:1").json()["id"] == "fake:1"
    missing = client.get("/v1/models/ghost:1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (
            {"model": "ghost", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
            "model",
        ),
        ({"model": "fake:1"}, 400, None, "messages"),
        (
            {"model": "fake:1", "messages": [{"role": "robot", "content": "x"}]},
            400,
            None,
            "messages.0.role",
        ),
        ({"model": "fake:1", "messages": []}, 400, None, "messages"),
        (
            {"model": "fake:1", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            400,
            None,
            "temperature",
        ),
        (
            {"model": "fake:1", "messages": [{"role": "user", "content": "w " * 100}]},
            400,
            "context_length_exceeded",
            "messages",
        ),
    ],
)
def test_client_mistakes_are_4xx_in_openais_shape(client, body, status, code, param):
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={**body, "stream": stream})
        assert r.status_code == status
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["code"], error["param"]) == (code, param)
        assert error["type"] == "invalid_request_error" and error["message"]


def test_bodies_that_are_not_json_objects(client):
    for raw in (b"{bad json", b"[1, 2]", b""):
        r = client.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"
    # JSON sent without a JSON Content-Type (curl -d) is still read as JSON.
    r = client.post(
        "/v1/chat/completions",
        content=json.dumps({"model": "fake:1", "messages": [{"role": "user", "content": "x"}]}),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200


def test_unknown_route_is_404_in_openai_shape(client):
    r = client.post("/v1/nothing-here", json={})
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


# -- tools and reasoning ----------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tool_turns_and_settings_reach_the_engine():
    greq = chat_to_engine(
        chat_req(
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "They want weather.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "name": "get_weather",
                    "content": "Sunny",
                },
            ],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=True,
            reasoning_effort="medium",
        )
    )
    assistant, tool = greq.messages[1:]
    assert assistant.tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "call_1"),)
    assert assistant.thinking == "They want weather." and assistant.content == ""
    assert (tool.role, tool.tool_call_id, tool.tool_name) == ("tool", "call_1", "get_weather")
    assert [t.name for t in greq.tools] == ["get_weather"]
    assert greq.tool_choice == ToolChoice("required", "get_weather")
    assert greq.parallel_tool_calls and greq.think == "medium"


def test_bad_tool_call_arguments_are_refused_naming_the_field():
    body = {
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
            }
        ]
    }
    with pytest.raises(InvalidRequest) as err:
        chat_to_engine(chat_req(**body))
    assert err.value.param == "messages.0.tool_calls.0.function.arguments"


def _batch_chunks(batch):
    chunks = _ChatChunks("id", 0, "m", include_usage=False)
    return [c.model_dump(mode="json")["choices"][0] for c in chunks.events(batch)]


def test_streamed_tool_calls_come_in_openais_incremental_shape():
    finished = Finished("stop", Usage(3, 4), Timings())
    call = ToolCall("get_weather", {"city": "Paris"}, "call_x")
    choices = _batch_chunks(
        [
            ThinkingDelta("Hm"),
            ThinkingDelta("m."),
            TextDelta("OK"),
            ToolCallEvent(0, call),
            finished,
        ]
    )
    assert [c["delta"] for c in choices] == [
        {"reasoning_content": "Hmm."},
        {"content": "OK"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_x",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
        {},
    ]
    assert choices[-1]["finish_reason"] == "tool_calls"
    assert _batch_chunks([TextDelta("x"), finished])[-1]["finish_reason"] == "stop"
