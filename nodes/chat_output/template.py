"""What a chat template can do, found by rendering it, and which output format it asks for.

A template "supports tools" when the tools it is given end up in the prompt,
and it can replay earlier tool calls when a call in the history does; whether
those calls' arguments must be objects or JSON strings is found the same way
(Qwen 2.5 and Llama 3 pipe them through ``tojson``, so a string would be
quoted twice). This is how llama.cpp's ``common/jinja/caps.cpp`` decides, with
probe values that cannot occur by chance.

The output format (``Family``) follows the markup the template teaches the
model, as llama.cpp's ``common/chat.cpp`` and Ollama's ``tools/`` parser pick
theirs: ``<tool_call>`` (Hermes, Qwen; ``<tool_call>[`` a list of calls in one
pair of tags, SmolLM2), ``[TOOL_CALLS]`` (Mistral),
``<|python_tag|>`` or Llama 3's headers (Llama 3.x JSON), else plain JSON.
Thinking is supported when the template holds a known pair of thinking tags.

``jinja_renderer`` compiles a template the way llama-cpp-python's
``Jinja2ChatFormatter`` does, for callers that must not load llama.cpp (the
ingress answering ``/api/show``); the engine probes with its own formatter.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Family = Literal["hermes", "hermes_list", "llama3", "mistral", "json"]
# Renders messages (and tools, or None) with the generation prompt added.
Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]

# (opening, closing) thinking tags that templates declare, most specific first.
THINK_TAGS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),
    ("[THINK]", "[/THINK]"),
    ("◁think▷", "◁/think▷"),
    ("<think>", "</think>"),
)

_TOOL = "corral_probe_tool"
_ARG, _VALUE = "corral_probe_arg", "corral_probe_value"
_CALL_ID = "call00001"  # nine characters, as Mistral's templates insist
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _TOOL,
            "description": "A tool.",
            "parameters": {
                "type": "object",
                "properties": {_ARG: {"type": "string", "description": "An argument."}},
                "required": [_ARG],
            },
        },
    }
]


@dataclass(frozen=True, slots=True)
class TemplateCaps:
    """What one chat template supports (see the module docstring)."""

    tools: bool = False  # tools given to it reach the prompt
    tool_calls: bool = False  # it renders earlier tool calls of the history
    object_arguments: bool = True  # ... whose arguments it takes as an object
    family: Family = "json"  # how the model writes a tool call
    think_tags: tuple[str, str] | None = None  # how the model marks its thinking
    think_levels: bool = False  # it reads reasoning_effort

    @property
    def thinking(self) -> bool:
        return self.think_tags is not None

    def capabilities(self) -> list[str]:
        """Ollama's names for these, as /api/show lists them (after "completion")."""
        return [name for name, yes in (("tools", self.tools), ("thinking", self.thinking)) if yes]


def probe(source: str, render: Render) -> TemplateCaps:
    """Find what the template ``source`` supports by rendering it with ``render``."""
    tools = _renders(render, [{"role": "user", "content": "Hi"}], _PROBE_TOOLS, _TOOL)
    object_arguments, tool_calls = True, False
    # The arguments must come out as JSON (a dict printed as Python's repr would not).
    marks = (f'"{_ARG}"', f'"{_VALUE}"')
    if tools:
        if _renders(render, _history(arguments={_ARG: _VALUE}), _PROBE_TOOLS, *marks):
            tool_calls = True
        elif _renders(render, _history(arguments=json.dumps({_ARG: _VALUE})), _PROBE_TOOLS, *marks):
            tool_calls, object_arguments = True, False
    return TemplateCaps(
        tools=tools,
        tool_calls=tool_calls,
        object_arguments=object_arguments,
        family=family_of(source),
        think_tags=think_tags_of(source),
        think_levels="reasoning_effort" in source,
    )


def family_of(source: str) -> Family:
    """The tool-call markup a template teaches (see the module docstring)."""
    if "<tool_call>[" in source:
        return "hermes_list"
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "<|start_header_id|>" in source:
        return "llama3"
    return "json"


def think_tags_of(source: str) -> tuple[str, str] | None:
    """The thinking tags a template holds, both of them, or None."""
    for opening, closing in THINK_TAGS:
        if opening in source and closing in source:
            return opening, closing
    return None


def _history(arguments: Any) -> list[dict[str, Any]]:
    call = {"id": _CALL_ID, "type": "function", "function": {"name": _TOOL, "arguments": arguments}}
    return [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Done", "tool_call_id": _CALL_ID, "name": _TOOL},
        {"role": "assistant", "content": "It is done."},
        {"role": "user", "content": "Thanks"},
    ]


def _renders(
    render: Render, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *marks: str
) -> bool:
    try:
        text = render(messages, tools)
    except Exception:  # noqa: BLE001 - a template that cannot render this cannot do it
        return False
    return all(mark in text for mark in marks)


# -- rendering without llama.cpp -------------------------------------------------------


class _IgnoreGeneration(jinja2.ext.Extension):
    """HuggingFace's ``{% generation %}`` tag, passed through (as llama-cpp-python does)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Sequence[str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise ValueError(message)


def jinja_renderer(source: str) -> Render:
    """A ``Render`` for ``source`` with llama-cpp-python's Jinja settings."""
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_IgnoreGeneration, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    template = env.from_string(source)

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return template.render(
            messages=messages,
            tools=tools,
            bos_token="",
            eos_token="",
            add_generation_prompt=True,
            raise_exception=_raise,
            strftime_now=lambda f: datetime.now().strftime(f),
        )

    return render


@functools.lru_cache(maxsize=32)
def template_caps(source: str | None) -> TemplateCaps:
    """``probe`` with ``jinja_renderer``; a missing or broken template supports nothing."""
    if not source:
        return TemplateCaps()
    try:
        render = jinja_renderer(source)
    except jinja2.TemplateError:
        return TemplateCaps()
    return probe(source, render)
