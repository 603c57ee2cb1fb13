"""Tools, tool calls and the tool choice: plain data, checked once at the API's edge.

Both APIs send tools in OpenAI's shape (``{"type": "function", "function":
{name, description, parameters}}``); ``parse_tools`` turns them into ``Tool``
records or refuses them with a 400 that names the field. Everything here is
frozen, picklable data: it rides inside a ``GenerateRequest`` to the replica.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nodes.errors import InvalidRequest

MAX_TOOLS = 128
MAX_NAME = 256
ToolMode = Literal["auto", "none", "required"]
ThinkLevel = Literal["low", "medium", "high"]
Think = bool | ThinkLevel


def _no_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name, what it does, and its JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=_no_parameters)

    def as_openai(self) -> dict[str, Any]:
        """The shape chat templates iterate over (``tool.function.name`` ...)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool, by the model or (in the history) by an earlier turn."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def arguments_json(self) -> str:
        """The arguments as OpenAI sends them: a JSON string."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether the model may (``auto``), must not (``none``) or must (``required``) call
    a tool; ``function`` names the one tool it must call."""

    mode: ToolMode = "auto"
    function: str | None = None

    @property
    def forced(self) -> bool:
        """The output must be a tool call (so it is constrained by a grammar)."""
        return self.mode == "required"


def parse_tools(raw: Sequence[Any] | None, param: str = "tools") -> tuple[Tool, ...]:
    """Tool definitions as clients send them, checked; ``InvalidRequest`` names the field."""
    if not raw:
        return ()
    if len(raw) > MAX_TOOLS:
        raise InvalidRequest(f"At most {MAX_TOOLS} tools per request.", param=param)
    tools: list[Tool] = []
    for i, item in enumerate(raw):
        tool = _tool(item, f"{param}.{i}")
        if any(t.name == tool.name for t in tools):
            raise InvalidRequest(
                f"Two tools are named {tool.name!r}; tool names must be unique.",
                param=f"{param}.{i}.function.name",
            )
        tools.append(tool)
    return tuple(tools)


def _check_kind(item: Any, at: str, what: str, kind: str, why: str) -> None:
    """``item`` is a mapping (``what`` says what it should be) whose ``type`` is ``kind``,
    or absent; ``why`` ends the message, with ``{got}`` for the type it has."""
    if not isinstance(item, Mapping):
        raise InvalidRequest(f"'{at}' must be {what}.", param=at)
    got = item.get("type", kind)
    if got != kind:
        message = f"'{at}.type' must be \"{kind}\"{why.format(got=repr(got))}"
        raise InvalidRequest(message, param=f"{at}.type")


def _tool(item: Any, at: str) -> Tool:
    _check_kind(item, at, "an object", "function", " (the only kind of tool), not {got}.")
    function = item.get("function")
    if function is None and "name" in item:  # a bare function definition
        function, at_fn = item, at
    else:
        at_fn = f"{at}.function"
    if not isinstance(function, Mapping):
        raise InvalidRequest(
            f"'{at_fn}' must be an object with the function's name and parameters.", param=at_fn
        )
    name = function.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise InvalidRequest(
            f"'{at_fn}.name' must be a non-empty string of at most {MAX_NAME} characters.",
            param=f"{at_fn}.name",
        )
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest(
            f"'{at_fn}.description' must be a string.", param=f"{at_fn}.description"
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = _no_parameters()
    _check_parameters(parameters, f"{at_fn}.parameters")
    return Tool(name=name, description=description, parameters=dict(parameters))


def _check_parameters(schema: Any, at: str) -> None:
    """A function's parameters are a JSON schema of an object (as OpenAI requires)."""
    _check_kind(schema, at, "a JSON schema object", "object", ": a function takes named arguments.")
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping) or not all(
        isinstance(v, Mapping | bool) for v in properties.values()
    ):
        raise InvalidRequest(
            f"'{at}.properties' must map each argument's name to its JSON schema.",
            param=f"{at}.properties",
        )
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise InvalidRequest(
            f"'{at}.required' must be a list of argument names.", param=f"{at}.required"
        )


def parse_tool_choice(raw: Any, tools: Sequence[Tool], param: str = "tool_choice") -> ToolChoice:
    """OpenAI's ``tool_choice``: "auto", "none", "required", or
    ``{"type": "function", "function": {"name": ...}}``; checked against ``tools``."""
    if raw is None:
        return ToolChoice()
    if raw in ("auto", "none", "required"):
        choice = ToolChoice(mode=raw)
    elif isinstance(raw, Mapping) and isinstance(raw.get("function"), Mapping):
        name = raw["function"].get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(
                f"'{param}.function.name' must name one of the tools.", param=f"{param}.function"
            )
        choice = ToolChoice(mode="required", function=name)
    else:
        raise InvalidRequest(
            f'\'{param}\' must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}.',
            param=param,
        )
    if choice.mode == "required" and not tools:
        raise InvalidRequest(
            f"'{param}' asks for a tool call, but no tools were given.", param=param
        )
    if choice.function is not None and all(t.name != choice.function for t in tools):
        raise InvalidRequest(
            f"'{param}' names the function {choice.function!r}, which is not among the tools.",
            param=f"{param}.function.name",
        )
    return choice


def parse_arguments(raw: Any, param: str) -> dict[str, Any]:
    """A tool call's arguments from a client: an object, or (OpenAI) a JSON string of one."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise InvalidRequest(
                f"'{param}' must be a JSON object (as a string or an object).", param=param
            ) from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{param}' must be a JSON object of named arguments.", param=param)
    return raw


def history_calls(calls: Sequence[Any] | None, index: int) -> tuple[ToolCall, ...]:
    """The tool calls an earlier assistant turn (message ``index``) made, from either API:
    both shapes have ``function.name``, ``function.arguments`` and an optional ``id``."""
    return tuple(
        ToolCall(
            name=call.function.name,
            arguments=parse_arguments(
                call.function.arguments, f"messages.{index}.tool_calls.{j}.function.arguments"
            ),
            id=call.id or "",
        )
        for j, call in enumerate(calls or ())
    )


def parse_think(raw: Any, param: str = "think") -> Think | None:
    """Ollama's ``think``: true, false, or a level "low", "medium", "high"."""
    if raw is None or isinstance(raw, bool):
        return raw
    if raw in ("low", "medium", "high"):
        return raw
    raise InvalidRequest(
        f'\'{param}\' must be true, false, "low", "medium" or "high", not {json.dumps(raw)}.',
        param=param,
    )


def think_from_effort(effort: str | None) -> Think | None:
    """OpenAI's ``reasoning_effort`` as a ``think`` setting ("none" turns thinking off)."""
    if effort is None:
        return None
    if effort == "none":
        return False
    if effort in ("minimal", "low"):
        return "low"
    if effort in ("medium", "high"):
        return effort  # type: ignore[return-value]
    raise InvalidRequest(
        f'\'reasoning_effort\' must be "none", "minimal", "low", "medium" or "high", '
        f"not {json.dumps(effort)}.",
        param="reasoning_effort",
    )
