"""Tool and thinking conversations as clients hold them, shared by the unit suite (the app
over in-process replicas) and the compat suite (the session's Corral on Ray).

Each helper drives the official client the way its docs show a tool loop: ask with
tools, run the call the model made, send its result back, read the final answer.
The first turn forces the call (``tool_choice: "required"``), so that even the
tiny test model makes a valid one; its words are nonsense, so the checks are on
structure: names, argument types, ids matching, finish reasons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        "parameters": {"type": "object", "properties": {}},
    },
}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 48}
OPEN_WEBUI = Path(__file__).parent.parent / "fixtures" / "open_webui"


def run_weather(arguments: dict[str, Any]) -> str:
    assert isinstance(arguments["city"], str)
    return json.dumps({"city": arguments["city"], "weather": "sunny", "celsius": 21})


# -- OpenAI ---------------------------------------------------------------------------------


def openai_streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[dict[str, Any], str]:
    """A streamed chat put back together as a message, checking OpenAI's tool-call pieces;
    and its finish reason."""
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for piece in delta.tool_calls or ():
            if piece.index not in calls:  # the first piece: id, type and name
                assert piece.id and piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.id is None and not piece.function.name
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    message = {
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [calls[i] for i in sorted(calls)],
    }
    return message, finish


def openai_round_trip(client: openai.OpenAI, model: str, *, stream: bool) -> None:
    """Tools -> a forced call -> its result -> a final answer, through the OpenAI client."""
    ask = {"model": model, "messages": QUESTION, "tools": TOOLS, **GREEDY}
    if stream:
        message, finish = openai_streamed(client, tool_choice="required", **ask)
        [call] = message["tool_calls"]
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
        assert message["content"] == ""
    else:
        r = client.chat.completions.create(tool_choice="required", **ask)
        finish, msg = r.choices[0].finish_reason, r.choices[0].message
        [call] = msg.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        assert msg.content is None and call.type == "function"
    assert finish == "tool_calls" and name in ("get_weather", "get_time")
    args = json.loads(arguments)
    result = run_weather(args) if name == "get_weather" else '{"time": "12:00"}'
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": result},
    ]
    final = {"model": model, "messages": history, "tools": TOOLS, "tool_choice": "none", **GREEDY}
    if stream:
        message, finish = openai_streamed(client, **final)
        assert message["content"] and not message["tool_calls"]
    else:
        r = client.chat.completions.create(**final)
        finish = r.choices[0].finish_reason
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert finish in ("stop", "length")


# -- Ollama ---------------------------------------------------------------------------------


def ollama_forced_call(http: httpx.Client, model: str, *, stream: bool) -> ollama.Message:
    """A forced call over /api/chat (``tool_choice`` is Corral's extension: the official
    client cannot send it), read with the official client's own types."""
    body = {
        "model": model,
        "messages": QUESTION,
        "tools": TOOLS,
        "tool_choice": "required",
        "options": {"temperature": 0, "num_predict": 48},
        "stream": stream,
    }
    if not stream:
        r = http.post("/api/chat", json=body)
        assert r.status_code == 200, r.text
        answer = ollama.ChatResponse.model_validate(r.json())
        assert answer.done and answer.done_reason == "stop"
        return answer.message
    with http.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200
        parts = [ollama.ChatResponse.model_validate_json(line) for line in r.iter_lines() if line]
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    calls = [c for p in parts for c in p.message.tool_calls or ()]
    assert all(p.message.content == "" for p in parts)  # no markup leaks into the answer
    return ollama.Message(role="assistant", content="", tool_calls=calls)


def ollama_round_trip(
    client: ollama.Client, http: httpx.Client, model: str, *, stream: bool
) -> None:
    """Tools -> a forced call -> its result (``tool_name``) -> a final answer."""
    message = ollama_forced_call(http, model, stream=stream)
    [call] = message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(call.function.arguments, dict)  # an object, not a JSON string
    result = (
        run_weather(call.function.arguments) if call.function.name == "get_weather" else "12:00"
    )
    history = [
        *QUESTION,
        message,
        {"role": "tool", "content": result, "tool_name": call.function.name},
    ]
    options = {"temperature": 0, "num_predict": 24}
    if stream:
        parts = list(
            client.chat(model=model, messages=history, tools=TOOLS, options=options, stream=True)
        )
        assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
        text = "".join(p.message.content for p in parts)
        calls = [c for p in parts for c in p.message.tool_calls or ()]
    else:
        r = client.chat(model=model, messages=history, tools=TOOLS, options=options)
        assert r.done and r.done_reason in ("stop", "length")
        text, calls = r.message.content, r.message.tool_calls or []
    assert text or calls  # the model answers, or calls again: both are well formed
    assert all(isinstance(c.function.arguments, dict) for c in calls)


# -- Anthropic ------------------------------------------------------------------------------

# The tools in Anthropic's shape: name, description, input_schema.
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]


GREEDY_BODY = {"temperature": 0}


def anthropic_message(client: anthropic.Anthropic, *, stream: bool, **kwargs: Any):
    """A message, whole or put together from its stream by the SDK's own accumulator."""
    if not stream:
        return client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as events:
        return events.get_final_message()


def anthropic_round_trip(client: anthropic.Anthropic, model: str, *, stream: bool) -> None:
    """Tools -> a forced tool_use -> its tool_result -> a final answer, as Anthropic's docs
    show the loop."""
    # Newer SDKs send sampling settings only as extra body fields.
    ask = {"model": model, "max_tokens": 48, "tools": ANTHROPIC_TOOLS, "extra_body": GREEDY_BODY}
    first = anthropic_message(
        client, stream=stream, messages=QUESTION, tool_choice={"type": "any"}, **ask
    )
    assert first.stop_reason == "tool_use" and first.role == "assistant"
    [call] = [block for block in first.content if block.type == "tool_use"]
    assert call.name in ("get_weather", "get_time") and call.id
    assert isinstance(call.input, dict)
    result = run_weather(call.input) if call.name == "get_weather" else '{"time": "12:00"}'
    history = [
        *QUESTION,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}],
        },
    ]
    final = anthropic_message(
        client, stream=stream, messages=history, tool_choice={"type": "none"}, **ask
    )
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.content[0].type == "text" and final.content[0].text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


# -- OpenAI Responses -----------------------------------------------------------------------

RESPONSE_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def responses_create(client: openai.OpenAI, *, stream: bool, **kwargs: Any):
    """A response, whole or the ``response.completed`` one of its stream (whose events the
    SDK's own accumulator checks, in order)."""
    if not stream:
        return client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        kinds = [event.type for event in events]
        assert kinds[:2] == ["response.created", "response.in_progress"], kinds
        if kinds[-1] == "response.incomplete":  # cut by max_output_tokens: no "completed"
            return events[-1].response
        assert kinds[-1] == "response.completed", kinds
        return stream.get_final_response()


def responses_round_trip(client: openai.OpenAI, model: str, *, stream: bool) -> None:
    """Function tools -> a forced function_call -> its function_call_output -> an answer."""
    ask = {"model": model, "max_output_tokens": 48, "temperature": 0, "tools": RESPONSE_TOOLS}
    first = responses_create(client, stream=stream, input=QUESTION, tool_choice="required", **ask)
    assert first.status == "completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name in ("get_weather", "get_time") and call.call_id
    args = json.loads(call.arguments)
    result = run_weather(args) if call.name == "get_weather" else '{"time": "12:00"}'
    history = [
        *QUESTION,
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": result},
    ]
    final = responses_create(client, stream=stream, input=history, tool_choice="none", **ask)
    assert final.status in ("completed", "incomplete") and final.output_text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


# -- Open WebUI --------------------------------------------------------------------------------


def open_webui_bodies(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(file, route, body) of every recorded Open WebUI request, for ``model``."""
    out = []
    for path in sorted(OPEN_WEBUI.glob("*.json")):
        body = json.loads(path.read_text().replace('"MODEL"', json.dumps(model)))
        route = "/v1/chat/completions" if path.name.startswith("openai_") else "/api/chat"
        out.append((path.name, route, body))
    return out


def replay(http: httpx.Client, route: str, body: dict[str, Any]) -> list[Any]:
    """Send one recorded body; the answer's objects (one, or every streamed one), after
    checking that it succeeded in its API's shape."""
    body = {**body}
    if route == "/api/chat":
        body["options"] = {**body.get("options", {}), "num_predict": 16}
    else:
        body["max_tokens"] = 16
    if not body.get("stream", route == "/api/chat"):
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        return [r.json()]
    with http.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    if route == "/api/chat":
        objects = [json.loads(line) for line in lines]
        assert objects[-1]["done"] and "error" not in objects[-1]
        return objects
    assert lines[-1] == "data: [DONE]", lines[-3:]
    # An error event is an object with an "error" key; the word "error" may be the model's
    # own text (a sampled token whose delta is exactly "error"), which is no failure.
    objects = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert not [o for o in objects if "error" in o], lines[-3:]
    return objects
