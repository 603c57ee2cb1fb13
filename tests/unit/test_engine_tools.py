"""LlamaCppEngine with tools and thinking, on the starter model's weights under real
templates of each tool-call family: a forced call is valid in every family's markup,
parsed back into a call, and never leaks into the text."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.chat_output.calls import Tool, ToolCall, ToolChoice
from nodes.engine import (
    ChatMessage,
    EngineSpec,
    Finished,
    GenerateRequest,
    Prompt,
    SamplingParams,
    TextDelta,
    ThinkingDelta,
    ToolCallEvent,
    load_engine,
)
from nodes.errors import InvalidRequest
from tests.support.chat_models import template, with_chat_template

WEATHER = Tool(
    "get_weather",
    "The weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days"],
    },
)
NOW = Tool("get_time")
FAMILIES = {
    "hermes": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "llama3": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}
MARKUP = ("<tool_call>", "[TOOL_CALLS]", '"name"', "<think>", "</think>")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def engine(request, starter_path: Path, tmp_path_factory) -> Iterator:
    path = tmp_path_factory.mktemp("family") / f"{request.param}.gguf"
    with_chat_template(starter_path, path, template(FAMILIES[request.param]))
    engine = load_engine(
        EngineSpec(model=f"{request.param}:135m", path=str(path), n_ctx=1024, n_threads=2)
    )
    assert engine.caps.family == request.param
    yield engine
    engine.close()


def run(engine, request: GenerateRequest) -> list:
    tokens = engine.encode(request)
    events = list(engine.generate(tokens, request.params, threading.Event()))
    assert isinstance(events[-1], Finished)
    return events


def ask(choice: ToolChoice, **fields) -> GenerateRequest:
    fields.setdefault("params", SamplingParams(temperature=0, max_tokens=80))
    return GenerateRequest(
        messages=(ChatMessage("user", "What is the weather in Paris for two days?"),),
        tools=(WEATHER, NOW),
        tool_choice=choice,
        **fields,
    )


def test_a_forced_call_is_valid_and_parsed_in_every_family(engine):
    events = run(engine, ask(ToolChoice("required")))
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].call.id
    call = calls[0].call
    assert call.name in ("get_weather", "get_time")
    if call.name == "get_weather":
        assert isinstance(call.arguments["city"], str) and isinstance(call.arguments["days"], int)
    assert text.strip() == "" and not any(mark in text for mark in MARKUP)
    assert events[-1].reason == "stop"


def test_a_named_function_and_several_calls(engine):
    events = run(engine, ask(ToolChoice("required", "get_time")))
    [call] = [e.call for e in events if isinstance(e, ToolCallEvent)]
    assert call.name == "get_time" and call.arguments == {}
    several = run(engine, ask(ToolChoice("required"), parallel_tool_calls=True))
    assert [e.index for e in several if isinstance(e, ToolCallEvent)][0] == 0


def test_a_call_in_the_history_renders_and_the_answer_is_text(engine):
    call = ToolCall("get_weather", {"city": "Paris", "days": 2}, "call_abc12345")
    request = GenerateRequest(
        messages=(
            ChatMessage("user", "What is the weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "Sunny", tool_call_id=call.id, tool_name=call.name),
        ),
        params=SamplingParams(temperature=0, max_tokens=8),
        tools=(WEATHER,),
        tool_choice=ToolChoice("none"),
    )
    tokens = engine.encode(request)
    assert isinstance(tokens, Prompt) and tokens.output.family is None
    events = run(engine, request)
    assert all(isinstance(e, TextDelta) for e in events[:-1])


def test_refusals(engine):
    with pytest.raises(InvalidRequest) as err:
        engine.encode(ask(ToolChoice("required"), params=SamplingParams(json_mode=True)))
    assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequest) as err:
        engine.encode(ask(ToolChoice(), think=True))
    assert "does not support thinking" in err.value.message


def test_the_starter_model_calls_tools_in_smollm2s_list(starter_path):
    engine = load_engine(
        EngineSpec(model="smollm2:135m", path=str(starter_path), n_ctx=1024, n_threads=2)
    )
    try:
        assert engine.caps.tools and engine.caps.family == "hermes_list"
        events = run(engine, ask(ToolChoice("required")))
        assert [type(e) for e in events] == [ToolCallEvent, Finished]
        raw = GenerateRequest(prompt="Hello", params=SamplingParams(max_tokens=2))
        assert not isinstance(engine.encode(raw), Prompt)
    finally:
        engine.close()


def test_thinking_the_prompt_opens_is_split_off(thinking_model_path):
    engine = load_engine(
        EngineSpec(model="thinker:135m", path=str(thinking_model_path), n_ctx=512, n_threads=2)
    )
    try:
        request = GenerateRequest(
            messages=(ChatMessage("user", "Hi"),),
            params=SamplingParams(temperature=0, max_tokens=10),
        )
        events = run(engine, request)
        assert len(events) > 1
        assert [type(e) for e in events[:-1]] == [ThinkingDelta] * (len(events) - 1)
        with pytest.raises(InvalidRequest) as err:
            engine.encode(ask(ToolChoice()))
        assert err.value.message == "thinker:135m does not support tools"
        off = run(
            engine, GenerateRequest(messages=request.messages, params=request.params, think=False)
        )
        assert not any(isinstance(e, ThinkingDelta) for e in off)
    finally:
        engine.close()
