"""Tool definitions, the tool choice and ``think``, checked at the API's edge."""

from __future__ import annotations

import pickle

import pytest

from nodes.chat_output.calls import (
    Tool,
    ToolCall,
    ToolChoice,
    parse_arguments,
    parse_think,
    parse_tool_choice,
    parse_tools,
    think_from_effort,
)
from nodes.engine import ChatMessage, GenerateRequest
from nodes.errors import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tools_in_openais_shape_become_tools():
    [tool] = parse_tools([WEATHER])
    assert tool.name == "get_weather" and tool.description == "The weather in a city."
    assert tool.as_openai() == WEATHER
    assert parse_tools(None) == parse_tools([]) == ()


def test_a_function_without_parameters_takes_none():
    [tool] = parse_tools([{"type": "function", "function": {"name": "now"}}])
    assert tool.parameters == {"type": "object", "properties": {}}
    [bare] = parse_tools([{"name": "now", "parameters": {"type": "object"}}])  # no wrapper
    assert bare.name == "now"


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        (["get_weather"], "tools.0"),
        ([{"type": "code_interpreter"}], "tools.0.type"),
        ([{"type": "function"}], "tools.0.function"),
        ([{"type": "function", "function": {"description": "x"}}], "tools.0.function.name"),
        ([{"type": "function", "function": {"name": " "}}], "tools.0.function.name"),
        (
            [{"type": "function", "function": {"name": "f", "description": 3}}],
            "tools.0.function.description",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            "tools.0.function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "tools.0.function.parameters.type",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}],
            "tools.0.function.parameters.properties",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}],
            "tools.0.function.parameters.required",
        ),
        ([WEATHER, WEATHER], "tools.1.function.name"),
    ],
)
def test_malformed_tools_are_refused_naming_the_field(tools, param):
    with pytest.raises(InvalidRequest) as err:
        parse_tools(tools)
    assert err.value.param == param


def test_tool_choice():
    tools = parse_tools([WEATHER])
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice("none", ()) == ToolChoice("none")
    assert parse_tool_choice("required", tools).forced
    named = parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    assert named == ToolChoice("required", "get_weather") and named.forced
    for bad, param in [
        ("always", "tool_choice"),
        ({"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        ({"type": "function", "function": {}}, "tool_choice.function"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            parse_tool_choice(bad, tools)
        assert err.value.param == param
    with pytest.raises(InvalidRequest):
        parse_tool_choice("required", ())


def test_arguments_are_an_object_or_a_json_string_of_one():
    assert parse_arguments('{"city": "Paris"}', "a") == {"city": "Paris"}
    assert parse_arguments({"city": "Paris"}, "a") == {"city": "Paris"}
    assert parse_arguments("", "a") == parse_arguments(None, "a") == {}
    for bad in ("{not json", "[1]", 3):
        with pytest.raises(InvalidRequest) as err:
            parse_arguments(bad, "messages.1.tool_calls.0.function.arguments")
        assert err.value.param == "messages.1.tool_calls.0.function.arguments"


def test_think_and_reasoning_effort():
    assert [parse_think(v) for v in (None, True, False, "low", "high")] == [
        None,
        True,
        False,
        "low",
        "high",
    ]
    with pytest.raises(InvalidRequest):
        parse_think("very")
    assert think_from_effort(None) is None and think_from_effort("none") is False
    assert think_from_effort("minimal") == "low" and think_from_effort("high") == "high"


def test_requests_with_tool_turns_are_plain_picklable_data():
    call = ToolCall("get_weather", {"city": "Paris"}, "call_1")
    request = GenerateRequest(
        messages=(
            ChatMessage("user", "Weather?"),
            ChatMessage("assistant", "", tool_calls=(call,), thinking="hmm"),
            ChatMessage("tool", "Sunny", tool_call_id="call_1", tool_name="get_weather"),
        ),
        tools=(Tool("get_weather"),),
        tool_choice=ToolChoice("required"),
        think="low",
    )
    assert pickle.loads(pickle.dumps(request)) == request
    assert call.arguments_json() == '{"city": "Paris"}'
