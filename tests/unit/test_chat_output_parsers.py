"""The output parsers, fed as a model streams: whole, token by token, and character by
character. Every split must give the same pieces, and no markup may reach the answer."""

from __future__ import annotations

import re

import pytest

from nodes.chat_output.calls import ToolCall
from nodes.chat_output.parsers import (
    ChatOutputParser,
    LeadingJsonCalls,
    MistralCalls,
    OutputParser,
    TaggedCalls,
    ThinkingSplitter,
)
from nodes.chat_output.pieces import Piece, Text, Thought, merge

NAMES = ("get_weather", "get_time")
PARIS = ToolCall("get_weather", {"city": "Paris"})
NOW = ToolCall("get_time", {})


def tokens(text: str) -> list[str]:
    """Roughly how a tokenizer cuts text: tags, words, spaces and single symbols."""
    return re.findall(r"<\|?/?\w+\|?>|\[/?\w+\]|\w+|\s+|[^\w\s]", text)


def splits(text: str) -> dict[str, list[str]]:
    return {"whole": [text], "tokens": tokens(text), "chars": list(text)}


def run(parser: OutputParser, chunks: list[str]) -> list[Piece]:
    out: list[Piece] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return merge(out + parser.finish())


def check(make, text: str, expected: list[Piece]) -> None:
    for how, chunks in splits(text).items():
        assert run(make(), chunks) == expected, how


HERMES = [
    ("Hello, world.", [Text("Hello, world.")]),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        [Text("Let me check.\n"), PARIS],
    ),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        [PARIS, NOW],
    ),
    # SmolLM2 writes a list of calls between the tags
    (
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}},\n'
        '{"name": "get_time", "arguments": {}}\n]</tool_call>',
        [PARIS, NOW],
    ),
    # arguments written as a JSON string, and a call the model did not close
    ('<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>', [NOW]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', [PARIS]),
    # only looks like a call
    ("Use a <tool> or a <tool_c> tag.", [Text("Use a <tool> or a <tool_c> tag.")]),
    ("Write <tool_call> tags", [Text("Write <tool_call> tags")]),
    ("<tool_call>{not json}</tool_call> ok", [Text("<tool_call>{not json}</tool_call> ok")]),
    (
        '<tool_call>{"name": "x", "colour": 1}</tool_call>',
        [Text('<tool_call>{"name": "x", "colour": 1}</tool_call>')],
    ),
    ("ends in <tool_", [Text("ends in <tool_")]),
]


@pytest.mark.parametrize(("text", "expected"), HERMES)
def test_hermes_and_qwen_calls_between_tags(text, expected):
    check(TaggedCalls, text, expected)


MISTRAL = [
    ("Bonjour.", [Text("Bonjour.")]),
    (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]',
        [ToolCall("get_weather", {"city": "Paris"}, "a1b2c3d4e")],
    ),
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}}]',
        [PARIS, NOW],
    ),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', [PARIS]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', [PARIS, NOW]),
    (
        "A list: [1, 2, 3] and [TOOL] and [TOOLS]",
        [Text("A list: [1, 2, 3] and [TOOL] and [TOOLS]")],
    ),
    ("[TOOL_CALLS][not json]", [Text("[TOOL_CALLS][not json]")]),
    ('[TOOL_CALLS][{"name": "get_weather"', [Text('[TOOL_CALLS][{"name": "get_weather"')]),
]


@pytest.mark.parametrize(("text", "expected"), MISTRAL)
def test_mistral_calls_after_the_marker(text, expected):
    check(MistralCalls, text, expected)


LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    ('\n <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
        '"parameters": {}}',
        [PARIS, NOW],
    ),
    (
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time"}]',
        [PARIS, NOW],
    ),
    # JSON that is an answer, not a call: a tool nobody offered, other keys, prose
    ('{"name": "Ada", "parameters": {}}', [Text('{"name": "Ada", "parameters": {}}')]),
    ('{"answer": 42}', [Text('{"answer": 42}')]),
    ("The set {1, 2} is small.", [Text("The set {1, 2} is small.")]),
    ('  {"name": "get_weather", "param', [Text('  {"name": "get_weather", "param')]),
    ('{"a": "}{"} then', [Text('{"a": "}{"} then')]),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), LLAMA3)
def test_llama3_and_plain_json_calls_lead_the_output(text, expected):
    check(lambda: LeadingJsonCalls(NAMES), text, expected)


THINKING = [
    ("<think>\nLet me see.\n</think>\n\nParis.", [Thought("Let me see.\n"), Text("Paris.")]),
    ("Paris.", [Text("Paris.")]),
    ("  <think>a</think>b", [Thought("a"), Text("b")]),
    ("<think>never closed", [Thought("never closed")]),
    ("<thinking> is a word", [Text("<thinking> is a word")]),
    ("Answer first <think>x</think>", [Text("Answer first <think>x</think>")]),
    ("<think>\n\n</think>\n\nOK", [Text("OK")]),
]


@pytest.mark.parametrize(("text", "expected"), THINKING)
def test_thinking_at_the_start_of_the_output(text, expected):
    check(lambda: ThinkingSplitter("<think>", "</think>"), text, expected)


def test_thinking_the_prompt_opened():
    make = lambda: ThinkingSplitter("<think>", "</think>", thinking=True)  # noqa: E731
    check(make, "\nHmm.\n</think>\n\nYes.", [Thought("Hmm.\n"), Text("Yes.")])
    check(make, "Hmm, no end", [Thought("Hmm, no end")])


def test_thinking_then_a_tool_call():
    def make() -> ChatOutputParser:
        return ChatOutputParser(ThinkingSplitter("<think>", "</think>"), TaggedCalls())

    text = (
        "<think>\nThe user wants weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    check(make, text, [Thought("The user wants weather.\n"), PARIS])
    # a tool call inside the thinking is thinking, not a call
    inside = '<think><tool_call>{"name": "get_time", "arguments": {}}</tool_call></think>ok'
    check(
        make,
        inside,
        [Thought('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'), Text("ok")],
    )


def test_streamed_text_is_released_as_soon_as_it_cannot_be_a_call():
    parser = TaggedCalls()
    assert parser.feed("Hello <") == [Text("Hello ")]
    assert parser.feed("b>") == [Text("<b>")]
    assert parser.feed("<tool_call>") == []
    assert parser.feed('{"name": "get_time", "arguments": {}}') == []
    assert parser.feed("</tool_call>") == [NOW]
    leading = LeadingJsonCalls(NAMES)
    assert leading.feed("  ") == []
    assert leading.feed("Sure") == [Text("  Sure")]
    assert leading.feed(" {x}") == [Text(" {x}")]
