"""Anthropic's Messages API, free of HTTP: requests in, messages or SSE text out.

``AnthropicServing`` turns a Messages request into the same ``GenerateRequest``
the OpenAI and Ollama chats make (a conversation of ``ChatMessage`` turns, tools,
thinking, images), runs it through the shared generation layer
(``deployments/generation.py``), and turns the engine's events back into content
blocks: ``thinking``, ``text`` and ``tool_use``. As on the other routes, a stream
is opened before the HTTP response starts, so an up-front error is an ordinary
HTTP error; an error after the first event is one SSE ``error`` event, after
which the stream ends.

What Anthropic's blocks become:

* ``system`` (a string or text blocks): a system turn;
* a user turn's ``tool_result`` blocks: tool turns before its other content,
  each named after the ``tool_use`` it answers (``is_error`` prefixes "Error: ");
* an assistant turn's ``tool_use`` and ``thinking`` blocks: its calls and thinking;
* ``image`` blocks with a base64 source (or a ``data:`` URL): images, in place.

``thinking.budget_tokens`` is accepted but not enforced: the model ends its
thinking itself, within ``max_tokens``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from deployments.anthropic import protocol as p
from deployments.backend import ModelBackend
from deployments.context import current_request
from deployments.errors import anthropic_body, classify
from deployments.generation import Result, answer
from deployments.images import image_from_base64, image_from_url
from deployments.protocol_base import log_ignored, stop_sequences
from deployments.replica import StreamEvent
from nodes.chat_output.calls import (
    Think,
    Tool,
    ToolCall,
    ToolChoice,
    parse_arguments,
    parse_tool_choice,
    parse_tools,
)
from nodes.engine import (
    IMAGE_MARKER,
    ChatMessage,
    Finished,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    ThinkingDelta,
    ToolCallEvent,
)
from nodes.errors import InvalidRequest

log = logging.getLogger("corral.anthropic")


class AnthropicServing:
    """``/v1/messages`` and ``/v1/messages/count_tokens`` over a ``ModelBackend``."""

    def __init__(self, backend: ModelBackend) -> None:
        self._backend = backend

    async def messages(self, req: p.MessagesRequest) -> p.Message | AsyncIterator[str]:
        greq = messages_to_engine(req)
        result = await answer(self._backend, req.model, greq, stream=req.stream, relax_think=True)
        message_id = f"msg_{uuid.uuid4().hex}"
        if not isinstance(result, Result):
            return self._stream(result, StreamedMessage(message_id, req.model))
        return message_from(result, message_id, req.model)

    async def count_tokens(self, req: p.CountTokensRequest) -> p.TokenCount:
        """The prompt's tokens, as the model's own template and tokenizer make them: a
        generation of no tokens, whose usage counts the prompt."""
        greq = count_to_engine(req)
        result = await answer(self._backend, req.model, greq, stream=False, relax_think=True)
        return p.TokenCount(input_tokens=result.finished.usage.prompt_tokens)

    async def _stream(
        self, stream: AsyncIterator[list[StreamEvent]], message: StreamedMessage
    ) -> AsyncIterator[str]:
        try:
            for event in message.start():
                yield sse(event)
            async for batch in stream:  # one write per batch: a message, not one per token
                if text := "".join(sse(event) for event in message.events(batch)):
                    yield text
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
            log.warning("stream failed: %s", exc)
            yield sse_error(exc)
        finally:
            await stream.aclose()


# -- request conversion (pure) ------------------------------------------------------------


def messages_to_engine(req: p.MessagesRequest) -> GenerateRequest:
    """Turn a Messages request into an engine request, refusing what Corral cannot do."""
    stop = stop_sequences(req.stop_sequences, "stop_sequences")
    given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
    params = SamplingParams(
        max_tokens=req.max_tokens,
        stop=stop,
        **{k: v for k, v in given.items() if v is not None},
    )
    return _conversation(req, params, req.keep_alive)


def count_to_engine(req: p.CountTokensRequest) -> GenerateRequest:
    """A token count's conversation, to be run for no tokens at all."""
    return _conversation(req, SamplingParams(max_tokens=0), None)


def _conversation(
    req: p.AnthropicRequest, params: SamplingParams, keep_alive: float | None
) -> GenerateRequest:
    log_ignored(log, req)
    tools = anthropic_tools(req.tools)
    choice, parallel = anthropic_tool_choice(req.tool_choice, tools)
    turns: list[ChatMessage] = []
    if system := _system_text(req.system):
        turns.append(ChatMessage("system", system))
    names: dict[str, str] = {}  # tool_use id -> the tool's name, for the results
    for i, msg in enumerate(req.messages):
        turns += _turns(i, msg, names)
    return GenerateRequest(
        messages=tuple(turns),
        params=params,
        keep_alive=keep_alive,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        think=anthropic_think(req.thinking, req.output_config),
    )


def anthropic_tools(raw: Sequence[Any] | None) -> tuple[Tool, ...]:
    """Custom tools (``name``, ``description``, ``input_schema``) as ``Tool`` records;
    Anthropic's server tools (web search, bash, the text editor ...) are refused."""
    if not raw:
        return ()
    functions: list[Any] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise InvalidRequest(f"'tools.{i}' must be an object.", param=f"tools.{i}")
        kind = item.get("type")
        if kind not in (None, "custom"):
            raise InvalidRequest(
                f"'tools.{i}.type' is {json.dumps(kind)}: Corral runs no server tools; send "
                "custom tools (name, description, input_schema) and run them yourself.",
                param=f"tools.{i}.type",
            )
        function = {"name": item.get("name"), "description": item.get("description")}
        if "input_schema" in item:
            function["parameters"] = item["input_schema"]
        functions.append({"type": "function", "function": function})
    try:
        return parse_tools(functions)
    except InvalidRequest as exc:  # name the fields as Anthropic's clients wrote them
        raise _renamed(exc) from None


def _renamed(exc: InvalidRequest) -> InvalidRequest:
    def rename(text: str) -> str:
        return text.replace(".function.parameters", ".input_schema").replace(".function", "")

    return InvalidRequest(rename(exc.message), param=rename(exc.param) if exc.param else None)


def anthropic_tool_choice(
    choice: p.ToolChoice | None, tools: Sequence[Tool]
) -> tuple[ToolChoice, bool]:
    """Anthropic's ``tool_choice`` (auto, any, tool, none) as Corral's, and whether several
    calls may come at once (only when ``disable_parallel_tool_use`` is false: a tiny model
    allowed more repeats its call until ``max_tokens``)."""
    if choice is None:
        return ToolChoice(), False
    parallel = choice.disable_parallel_tool_use is False
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest(
                "'tool_choice.name' must name one of the tools.", param="tool_choice.name"
            )
        raw: Any = {"type": "function", "function": {"name": choice.name}}
    else:
        raw = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    try:
        return parse_tool_choice(raw, tools), parallel
    except InvalidRequest as exc:
        raise _renamed(exc) from None


def anthropic_think(
    thinking: p.Thinking | None, output: p.OutputConfig | None = None
) -> Think | None:
    """``thinking``: enabled turns the model's thinking on, disabled off; adaptive (or none)
    leaves it to the model's template, or to ``output_config.effort`` as a level."""
    if thinking is not None and thinking.type != "adaptive":
        return thinking.type == "enabled"
    effort = output.effort if output is not None else None
    if effort is None:
        return None
    return "high" if effort in ("xhigh", "max") else effort  # type: ignore[return-value]


def _system_text(system: str | list[p.TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n".join(block.text for block in system)


def _turns(index: int, msg: p.MessageIn, names: dict[str, str]) -> list[ChatMessage]:
    """A message's turns: its tool results (as tool turns), then the message itself."""
    if isinstance(msg.content, str):
        return [ChatMessage(msg.role, msg.content)]
    texts: list[str] = []
    images: list[bytes] = []
    calls: list[ToolCall] = []
    thoughts: list[str] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(msg.content):
        at = f"messages.{index}.content.{j}"
        if isinstance(block, p.TextBlock):
            texts.append(block.text)
        elif isinstance(block, p.ImageBlock):
            images.append(_image(block.source, f"{at}.source"))
            texts.append(IMAGE_MARKER)
        elif isinstance(block, p.ToolUseBlock):
            _only_in(msg.role, "assistant", block.type, at)
            arguments = parse_arguments(block.input, f"{at}.input")
            calls.append(ToolCall(name=block.name, arguments=arguments, id=block.id))
            names[block.id] = block.name
        elif isinstance(block, p.ToolResultBlock):
            _only_in(msg.role, "user", block.type, at)
            results.append(_tool_result(block, at, names))
        elif isinstance(block, p.ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, p.DocumentBlock):
            raise InvalidRequest(
                f"'{at}' is a {block.type} block, which Corral does not support; send text.",
                param=f"{at}.type",
            )
        # redacted thinking: nothing a local model can read
    turns = results
    if texts or calls or thoughts or not results:
        turns.append(
            ChatMessage(
                role=msg.role,
                content="\n".join(texts),
                tool_calls=tuple(calls),
                thinking="\n".join(thoughts) if msg.role == "assistant" else "",
                images=tuple(images),
            )
        )
    return turns


def _only_in(role: str, expected: str, kind: str, at: str) -> None:
    if role != expected:
        raise InvalidRequest(
            f"'{at}' is a {kind} block, which only an {expected} turn may hold.",
            param=f"{at}.type",
        )


def _tool_result(block: p.ToolResultBlock, at: str, names: Mapping[str, str]) -> ChatMessage:
    images: list[bytes] = []
    if block.content is None:
        text = ""
    elif isinstance(block.content, str):
        text = block.content
    else:
        parts: list[str] = []
        for k, part in enumerate(block.content):
            if isinstance(part, p.TextBlock):
                parts.append(part.text)
            else:
                images.append(_image(part.source, f"{at}.content.{k}.source"))
                parts.append(IMAGE_MARKER)
        text = "\n".join(parts)
    if block.is_error:
        text = f"Error: {text}"
    return ChatMessage(
        role="tool",
        content=text,
        tool_call_id=block.tool_use_id,
        tool_name=names.get(block.tool_use_id, ""),
        images=tuple(images),
    )


def _image(source: p.ImageSource, at: str) -> bytes:
    if source.type == "base64":
        kind = (source.media_type or "").strip().lower()
        if kind and not kind.startswith("image/"):
            raise InvalidRequest(
                f"The image's media_type is {kind}, not an image type.", param=f"{at}.media_type"
            )
        return image_from_base64(source.data or "", f"{at}.data")
    if source.type == "url":
        return image_from_url(source.url or "", f"{at}.url")
    raise InvalidRequest(
        "Images from Anthropic's Files API are not supported: send the image as base64.",
        param=f"{at}.type",
    )


# -- answers -------------------------------------------------------------------------------


def stop_reason(finished: Finished, *, called: bool) -> str:
    """Anthropic's stop_reason for how the generation ended."""
    if finished.reason == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    # An engine that says which stop sequence ended the text (Finished.stop_sequence).
    return "stop_sequence" if getattr(finished, "stop_sequence", None) else "end_turn"


def _usage(finished: Finished) -> dict[str, int]:
    u = finished.usage
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id or f"toolu_{uuid.uuid4().hex[:24]}",
        "name": call.name,
        "input": call.arguments,
    }


def message_from(result: Result, message_id: str, model: str) -> p.Message:
    """A whole answer: its thinking, its text, then its tool calls, as content blocks."""
    content: list[dict[str, Any]] = []
    if result.thinking:
        content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
    if result.text or not result.tool_calls:
        content.append({"type": "text", "text": result.text})
    content += [tool_use_block(call) for call in result.tool_calls]
    finished = result.finished
    return p.Message(
        id=message_id,
        model=model,
        content=content,
        stop_reason=stop_reason(finished, called=bool(result.tool_calls)),
        stop_sequence=getattr(finished, "stop_sequence", None),
        usage=p.Usage(**_usage(finished)),
    )


@dataclass(slots=True)
class StreamedMessage:
    """The events of one streamed answer, in Anthropic's order: ``message_start`` and a
    ``ping``; for each block ``content_block_start``, its deltas, ``content_block_stop``;
    then ``message_delta`` (stop reason, usage) and ``message_stop``."""

    id: str
    model: str
    index: int = -1  # the index of the last block started
    open: str | None = None  # the type of the block still open: "text" or "thinking"
    called: bool = False

    def start(self) -> list[dict[str, Any]]:
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def events(self, batch: list[StreamEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, group in groupby(batch, key=type):
            events = list(group)
            if kind is TextDelta or kind is ThinkingDelta:
                text = "".join(e.text for e in events)  # type: ignore[union-attr]
                if text:
                    out += self._delta("text" if kind is TextDelta else "thinking", text)
            elif kind is ToolCallEvent:
                for event in events:
                    out += self._tool_use(event.call)  # type: ignore[union-attr]
            elif kind is Finished:
                out += self._finish(events[-1])  # type: ignore[arg-type]
        return out

    def _delta(self, block: str, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.open != block:
            out += self._close()
            out.append(self._start({"type": block, block: ""} | _signature(block)))
            self.open = block
        delta = {"type": f"{block}_delta", block: text}
        out.append({"type": "content_block_delta", "index": self.index, "delta": delta})
        return out

    def _tool_use(self, call: ToolCall) -> list[dict[str, Any]]:
        self.called = True
        block = tool_use_block(call)
        arguments = json.dumps(block["input"], ensure_ascii=False)
        delta = {"type": "input_json_delta", "partial_json": arguments}
        return [
            *self._close(),
            self._start({**block, "input": {}}),
            {"type": "content_block_delta", "index": self.index, "delta": delta},
            {"type": "content_block_stop", "index": self.index},
        ]

    def _start(self, block: dict[str, Any]) -> dict[str, Any]:
        self.index += 1
        return {"type": "content_block_start", "index": self.index, "content_block": block}

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _finish(self, finished: Finished) -> list[dict[str, Any]]:
        out = []
        if self.index < 0:  # nothing said at all: one empty text block, as a whole answer has
            out.append(self._start({"type": "text", "text": ""}))
            self.open = "text"
        out += self._close()
        delta = {
            "stop_reason": stop_reason(finished, called=self.called),
            "stop_sequence": getattr(finished, "stop_sequence", None),
        }
        out.append({"type": "message_delta", "delta": delta, "usage": _usage(finished)})
        out.append({"type": "message_stop"})
        return out


def _signature(block: str) -> dict[str, str]:
    # A thinking block carries a signature in Anthropic's shape; Corral signs nothing.
    return {"signature": ""} if block == "thinking" else {}


def sse(event: dict[str, Any]) -> str:
    """One SSE event as Anthropic sends it: its type as the event name, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def sse_error(exc: BaseException) -> str:
    """A streaming error: one ``error`` event in Anthropic's error shape."""
    ctx = current_request()
    return sse(anthropic_body(classify(exc), ctx.id if ctx is not None else None))
