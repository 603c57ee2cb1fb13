"""Finding where a JSON value that a model is still writing ends, and reading calls from it."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from nodes.chat_output.calls import ToolCall


def json_end(text: str, start: int = 0) -> int | None:
    """The index just after the object or array opening at ``text[start]``; None while
    it is unfinished. Brackets inside strings do not count."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def load(text: str) -> Any:
    """The JSON value ``text`` holds, or None if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def call_from(obj: Any, names: Collection[str] | None = None) -> ToolCall | None:
    """A tool call from ``{"name": ..., "arguments" | "parameters": {...}}`` (also wrapped
    in ``{"function": {...}}``); None if ``obj`` is not one, or names a tool not in
    ``names`` (when given)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = {**obj["function"], "id": obj.get("id", "")}
    name = obj.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = load(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        return None
    extra = set(obj) - {"name", "arguments", "parameters", "id", "type"}
    if extra:  # an object that merely has a "name" key, not a call
        return None
    call_id = obj.get("id")
    return ToolCall(name=name, arguments=arguments, id=call_id if isinstance(call_id, str) else "")


def calls_from(value: Any, names: Collection[str] | None = None) -> list[ToolCall] | None:
    """The calls a JSON object (one call) or array (several) holds; None if any is not one."""
    items = value if isinstance(value, list) else [value]
    calls = [call_from(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]
