"""The grammars that force a tool call: the family's markup around calls of the offered
tools, arguments by each tool's schema. (That the model's output under them is a valid
call of every family is checked on the real engine: ``test_engine_tools.py``.)"""

from __future__ import annotations

import pytest

from nodes.chat_output.calls import Tool
from nodes.chat_output.grammar import tool_call_grammar
from nodes.errors import InvalidRequest

WEATHER = Tool(
    "get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
NOW = Tool("get_time")


def root(grammar: str) -> str:
    [line] = [line for line in grammar.splitlines() if line.startswith("root ::= ")]
    return line.removeprefix("root ::= ")


@pytest.mark.parametrize(
    ("family", "one", "several"),
    [
        ("hermes", '"<tool_call>\\n" call "\\n</tool_call>"', '( "\\n" "<tool_call>\\n" call'),
        ("llama3", "call", '( "; " call)*'),
        ("mistral", '"[TOOL_CALLS][" call "]"', '( ", " call )*'),
        ("hermes_list", '"<tool_call>[\\n" call "\\n]</tool_call>"', '( ",\\n" call )*'),
        ("json", "call", '( "\\n" call)*'),
    ],
)
def test_each_family_wraps_calls_in_its_markup(family, one, several):
    assert root(tool_call_grammar([WEATHER, NOW], family)) == one
    assert several in root(tool_call_grammar([WEATHER, NOW], family, parallel=True))


def test_the_calls_are_of_the_offered_tools_with_their_schemas():
    grammar = tool_call_grammar([WEATHER, NOW], "hermes")
    assert '"\\"get_weather\\""' in grammar and '"\\"get_time\\""' in grammar
    assert '"\\"city\\""' in grammar and "integer" in grammar
    assert '"\\"arguments\\""' in grammar
    assert '"\\"parameters\\""' in tool_call_grammar([WEATHER], "llama3")  # Llama 3's key
    named = tool_call_grammar([WEATHER, NOW], "hermes", function="get_time")
    assert "get_weather" not in named and "get_time" in named


def test_thinking_the_prompt_opened_is_closed_first():
    grammar = tool_call_grammar([NOW], "hermes", prefix="</think>\n\n")
    assert root(grammar).startswith('"</think>\\n\\n" "<tool_call>\\n" call')


def test_a_schema_no_grammar_can_express_is_a_400():
    bad = Tool("f", parameters={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(InvalidRequest) as err:
        tool_call_grammar([bad], "hermes")
    assert err.value.param == "tools"
