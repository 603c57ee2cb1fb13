"""From a chat request and its model's template to what the engine does with the output.

``check_request`` refuses what the template cannot do (tools, thinking) as
Ollama refuses it; ``template_messages`` and ``template_kwargs`` are what the
template is rendered with; ``plan_output`` decides, once the prompt is
rendered, how the output is read (``OutputPlan.parser``) and whether it is
constrained to a tool call (``OutputPlan.grammar``).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodes.chat_output.calls import Think, Tool, ToolCall, ToolChoice
from nodes.chat_output.parsers import (
    ChatOutputParser,
    OutputParser,
    ThinkingSplitter,
    tool_call_parser,
)
from nodes.chat_output.template import Family, TemplateCaps
from nodes.errors import InvalidRequest

if TYPE_CHECKING:
    from nodes.engine import ChatMessage

_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How to read one generation's output, and what constrains it."""

    family: Family | None = None  # tool-call format to parse; None: no tools offered
    tool_names: tuple[str, ...] = ()
    think_tags: tuple[str, str] | None = None  # thinking to split off; None: none
    thinking_open: bool = False  # the prompt ends inside the thinking tags
    grammar: str | None = None  # GBNF forcing a tool call (tool_choice required)

    def parser(self) -> OutputParser | None:
        """A fresh parser for one output; None when the text is all answer."""
        thinking = None
        if self.think_tags is not None:
            thinking = ThinkingSplitter(*self.think_tags, thinking=self.thinking_open)
        calls = tool_call_parser(self.family, self.tool_names) if self.family else None
        if thinking is None and calls is None:
            return None
        return ChatOutputParser(thinking, calls)


def offers_tools(tools: Sequence[Tool], choice: ToolChoice) -> bool:
    """Whether the model is shown the tools (not with ``tool_choice: "none"``)."""
    return bool(tools) and choice.mode != "none"


def check_request(
    model: str, caps: TemplateCaps, tools: Sequence[Tool], choice: ToolChoice, think: Think | None
) -> None:
    """Refuse tools or thinking that the model's template cannot take, in Ollama's words."""
    if offers_tools(tools, choice) and not caps.tools:
        raise InvalidRequest(f"{model} does not support tools", param="tools")
    if think not in (None, False) and not caps.thinking:
        raise InvalidRequest(f'"{model}" does not support thinking', param="think")


def thinks(caps: TemplateCaps, think: Think | None) -> bool:
    """Whether thinking is on: asked for, or (unset) the template's default for a thinker."""
    return caps.thinking and think is not False


def template_kwargs(caps: TemplateCaps, think: Think | None) -> dict[str, Any]:
    """Extra template variables: ``enable_thinking`` (Qwen 3 and others; unset, a thinker
    thinks, as Ollama has it), and ``reasoning_effort`` for templates that read a level."""
    if not caps.thinking:
        return {}
    kwargs: dict[str, Any] = {"enable_thinking": think is not False}
    if caps.think_levels and isinstance(think, str):
        kwargs["reasoning_effort"] = think
    return kwargs


def template_messages(messages: Sequence[ChatMessage], caps: TemplateCaps) -> list[dict[str, Any]]:
    """Messages as chat templates read them (OpenAI's shape): tool calls with arguments as
    an object or a JSON string (as the template takes them), tool results with their
    call's id and the tool's name, thinking as ``reasoning_content``."""
    ids = _mistral_id if caps.family == "mistral" else (lambda i: i)
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [_call_dict(c, caps.object_arguments, ids) for c in m.tool_calls]
        if m.role == "tool":
            if m.tool_call_id:
                d["tool_call_id"] = ids(m.tool_call_id)
            if m.tool_name:
                d["name"] = m.tool_name
        if m.thinking:
            d["reasoning_content"] = m.thinking
        out.append(d)
    return out


def _call_dict(call: ToolCall, as_object: bool, ids: Any) -> dict[str, Any]:
    arguments: Any = call.arguments if as_object else call.arguments_json()
    function = {"name": call.name, "arguments": arguments}
    return {"id": ids(call.id), "type": "function", "function": function}


def _mistral_id(call_id: str) -> str:
    """Mistral's templates take only nine letters and digits: other ids are mapped,
    the same way each time, so a call and its result still match."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:9])


def plan_output(
    caps: TemplateCaps,
    prompt: str,
    tools: Sequence[Tool],
    choice: ToolChoice,
    think: Think | None,
    parallel: bool = False,
) -> OutputPlan:
    """How to read the output of ``prompt`` (already rendered) for this request."""
    thinking_open = caps.think_tags is not None and prompt.rstrip().endswith(caps.think_tags[0])
    # Thinking the prompt opened is split off even when it was not asked for (a template
    # that ignores enable_thinking): its closing tag must not reach the answer.
    think_tags = caps.think_tags if thinks(caps, think) or thinking_open else None
    offered = offers_tools(tools, choice)
    grammar = None
    if offered and choice.forced:
        from nodes.chat_output.grammar import tool_call_grammar  # loads llama.cpp

        grammar = tool_call_grammar(
            tools,
            caps.family,
            function=choice.function,
            parallel=parallel and choice.function is None,
            prefix=f"{caps.think_tags[1]}\n\n" if thinking_open and caps.think_tags else "",
        )
    return OutputPlan(
        family=caps.family if offered else None,
        tool_names=tuple(t.name for t in tools) if offered else (),
        think_tags=think_tags,
        thinking_open=thinking_open,
        grammar=grammar,
    )
