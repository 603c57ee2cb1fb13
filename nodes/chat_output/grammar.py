"""GBNF grammars that force a tool call, in the markup of the template's family.

For ``tool_choice: "required"`` (or a named function) the output is
constrained so that even a tiny model writes a valid call: the arguments
follow each tool's JSON schema (llama-cpp-python's ``SchemaConverter``, the
converter behind ``response_format``), the name is one of the tools (or the
one named), and the call is wrapped as the family writes it, so the same
parser reads it back. With ``parallel`` several calls may follow each other.
``prefix`` is written first (``"</think>"`` closes thinking that the prompt
opened, so the model does not call the tool inside its thoughts).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from nodes.chat_output.calls import Tool
from nodes.chat_output.template import Family
from nodes.errors import InvalidRequest

# How each family wraps one call (around the call's JSON) and separates several.
_WRAP: dict[Family, tuple[str, str, str]] = {
    "hermes": ('"<tool_call>\\n" ', ' "\\n</tool_call>"', ' "\\n" '),
    "llama3": ("", "", ' "; " '),
    "json": ("", "", ' "\\n" '),
}


def _call_schema(tool: Tool, arguments_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def tool_call_grammar(
    tools: Sequence[Tool],
    family: Family,
    *,
    function: str | None = None,
    parallel: bool = False,
    prefix: str = "",
) -> str:
    """A GBNF grammar whose every sentence is one (or, with ``parallel``, several) calls
    of ``tools`` (only of ``function`` when given), as ``family`` writes them."""
    chosen = [t for t in tools if function is None or t.name == function]
    key = "parameters" if family == "llama3" else "arguments"
    schemas = [_call_schema(t, key) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    converter = SchemaConverter(
        prop_order={"name": 0, key: 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        schema = converter.resolve_refs(schema, "tools")
        converter.visit(schema, "call")
    except (RecursionError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise InvalidRequest(
            f"A tool's parameters cannot be turned into a grammar: {exc!r}", param="tools"
        ) from None
    except Exception as exc:  # the converter raises bare Exceptions on schemas it cannot read
        raise InvalidRequest(
            f"A tool's parameters cannot be turned into a grammar: {exc}", param="tools"
        ) from None
    head = f"{json.dumps(prefix)} " if prefix else ""
    if family == "mistral":
        many = ' ( ", " call )*' if parallel else ""
        root = f'{head}"[TOOL_CALLS][" call{many} "]"'
    elif family == "hermes_list":
        many = ' ( ",\\n" call )*' if parallel else ""
        root = f'{head}"<tool_call>[\\n" call{many} "\\n]</tool_call>"'
    else:
        opening, closing, between = _WRAP[family]
        one = f"{opening}call{closing}"
        root = f"{head}{one}" + (f" ({between}{one})*" if parallel else "")
    return converter.format_grammar() + f"\nroot ::= {root}\n"
