"""OpenAI's Responses API, free of HTTP: requests in, response objects or SSE text out.

``ResponsesServing`` turns ``input`` (a string, or items: messages, function
calls, their outputs, reasoning) into the same ``GenerateRequest`` the chat
routes make, runs it through the shared generation layer
(``deployments/generation.py``), and turns the engine's events back into output
items: ``reasoning`` (the model's thinking, as ``reasoning_text``), ``message``
(``output_text``) and ``function_call``. Streams carry OpenAI's typed events,
each with its ``sequence_number``; an error after the first event is one
``error`` event and a ``response.failed``, after which the stream ends.

Corral keeps no responses: ``store`` is accepted and ignored, and
``previous_response_id`` (or ``conversation``) is a 400 that says to send the
whole conversation as ``input``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Any

from deployments.backend import ModelBackend
from deployments.errors import classify
from deployments.generation import Result, answer
from deployments.images import image_from_url
from deployments.protocol_base import log_ignored
from deployments.replica import StreamEvent
from deployments.responses import protocol as p
from nodes.chat_output.calls import (
    Tool,
    ToolCall,
    ToolChoice,
    parse_arguments,
    parse_tool_choice,
    parse_tools,
    think_from_effort,
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

log = logging.getLogger("corral.responses")


class ResponsesServing:
    """``POST /v1/responses`` over a ``ModelBackend``."""

    def __init__(self, backend: ModelBackend) -> None:
        self._backend = backend

    async def create(self, req: p.ResponsesRequest) -> dict[str, Any] | AsyncIterator[str]:
        greq = responses_to_engine(req)
        result = await answer(self._backend, req.model, greq, stream=req.stream, relax_think=True)
        head = ResponseHead(f"resp_{uuid.uuid4().hex}", int(time.time()), req)
        if not isinstance(result, Result):
            return self._stream(result, StreamedResponse(head))
        return response_from(result, head)

    async def _stream(
        self, stream: AsyncIterator[list[StreamEvent]], response: StreamedResponse
    ) -> AsyncIterator[str]:
        try:
            for event in response.start():
                yield sse(event)
            async for batch in stream:  # one write per batch: a message, not one per token
                if text := "".join(sse(event) for event in response.events(batch)):
                    yield text
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
            log.warning("stream failed: %s", exc)
            for event in response.failed(exc):
                yield sse(event)
        finally:
            await stream.aclose()


# -- request conversion (pure) ------------------------------------------------------------


def responses_to_engine(req: p.ResponsesRequest) -> GenerateRequest:
    """Turn a Responses request into an engine request, refusing what Corral cannot do."""
    log_ignored(log, req)
    for name in ("previous_response_id", "conversation"):
        if getattr(req, name) is not None:
            raise InvalidRequest(
                f"Corral keeps no responses, so '{name}' cannot be used: send the whole "
                "conversation as 'input' (earlier outputs included).",
                param=name,
            )
    if req.background:
        raise InvalidRequest(
            "Background responses are not supported (Corral keeps no responses to poll).",
            param="background",
        )
    tools = response_tools(req.tools)
    turns: list[ChatMessage] = []
    if req.instructions:
        turns.append(ChatMessage("system", req.instructions))
    if isinstance(req.input, str):
        turns.append(ChatMessage("user", req.input))
    else:
        turns += _turns(req.input)
    return GenerateRequest(
        messages=tuple(turns),
        params=_sampling(req),
        keep_alive=req.keep_alive,
        tools=tools,
        tool_choice=response_tool_choice(req.tool_choice, tools),
        parallel_tool_calls=bool(req.parallel_tool_calls),
        think=_think(req.reasoning),
    )


def response_tools(raw: Sequence[Any] | None) -> tuple[Tool, ...]:
    """Function tools (``{"type": "function", "name", "description", "parameters"}``);
    OpenAI's hosted tools (web search, file search ...) are refused."""
    for i, item in enumerate(raw or ()):
        if isinstance(item, Mapping) and item.get("type", "function") != "function":
            raise InvalidRequest(
                f"'tools.{i}.type' is {json.dumps(item.get('type'))}: Corral runs no hosted "
                'tools; send function tools ({"type": "function", "name", "parameters"}).',
                param=f"tools.{i}.type",
            )
    return parse_tools(raw)


def response_tool_choice(raw: Any, tools: Sequence[Tool]) -> ToolChoice:
    """ "auto", "none", "required" or ``{"type": "function", "name": ...}``."""
    if isinstance(raw, Mapping) and raw.get("type") == "function" and "function" not in raw:
        raw = {"type": "function", "function": {"name": raw.get("name")}}
    return parse_tool_choice(raw, tools)


def _sampling(req: p.ResponsesRequest) -> SamplingParams:
    fmt = req.text.format if req.text is not None else None
    json_schema = None
    if fmt is not None and fmt.type == "json_schema":
        if not isinstance(fmt.schema_, dict):
            raise InvalidRequest(
                "text.format.schema must be a JSON schema object.", param="text.format.schema"
            )
        json_schema = fmt.schema_
    given = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
    }
    return SamplingParams(
        max_tokens=req.max_output_tokens,
        json_mode=fmt is not None and fmt.type == "json_object",
        json_schema=json_schema,
        **{k: v for k, v in given.items() if v is not None},
    )


def _think(reasoning: p.Reasoning | None) -> Any:
    if reasoning is None:
        return None
    try:
        return think_from_effort(reasoning.effort)
    except InvalidRequest as exc:
        raise InvalidRequest(
            exc.message.replace("'reasoning_effort'", "'reasoning.effort'"),
            param="reasoning.effort",
        ) from None


def _turns(items: Sequence[Any]) -> list[ChatMessage]:
    """The conversation the items hold. Function calls join the assistant turn before them
    (parallel calls are one turn); reasoning goes with the assistant turn after it."""
    turns: list[ChatMessage] = []
    names: dict[str, str] = {}  # call_id -> the function's name, for the outputs
    thinking = ""
    for i, item in enumerate(items):
        at = f"input.{i}"
        if isinstance(item, p.ReasoningItem):
            thinking += "".join(part.text for part in item.content or item.summary)
        elif isinstance(item, p.MessageItem):
            text, images = _content(item.content, f"{at}.content")
            role = "system" if item.role == "developer" else item.role
            turn = ChatMessage(role, text, images=images)
            if role == "assistant" and thinking:
                turn, thinking = replace(turn, thinking=thinking), ""
            turns.append(turn)
        elif isinstance(item, p.FunctionCallItem):
            arguments = parse_arguments(item.arguments, f"{at}.arguments")
            call = ToolCall(name=item.name, arguments=arguments, id=item.call_id)
            names[item.call_id] = item.name
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":
                turns[-1] = replace(last, tool_calls=(*last.tool_calls, call))
            else:
                turns.append(ChatMessage("assistant", "", tool_calls=(call,), thinking=thinking))
                thinking = ""
        elif isinstance(item, p.FunctionCallOutputItem):
            text, images = _content(item.output, f"{at}.output")
            turns.append(
                ChatMessage(
                    "tool",
                    text,
                    tool_call_id=item.call_id,
                    tool_name=names.get(item.call_id, ""),
                    images=images,
                )
            )
        else:
            raise InvalidRequest(
                f"'{at}' is a {item.type} item, which Corral does not support: send messages, "
                "function calls and their outputs.",
                param=f"{at}.type",
            )
    return turns


def _content(content: str | list[Any], at: str) -> tuple[str, tuple[bytes, ...]]:
    if isinstance(content, str):
        return content, ()
    texts: list[str] = []
    images: list[bytes] = []
    for j, part in enumerate(content):
        if isinstance(part, p.TextPart):
            texts.append(part.text)
        elif isinstance(part, p.ImagePart):
            if part.image_url is None:
                raise InvalidRequest(
                    "An input_image needs its image_url (a data: URL); file ids are not supported.",
                    param=f"{at}.{j}.image_url",
                )
            images.append(image_from_url(part.image_url, f"{at}.{j}.image_url"))
            texts.append(IMAGE_MARKER)
        else:
            raise InvalidRequest(
                f"'{at}.{j}' is {part.type} content, which Corral does not support.",
                param=f"{at}.{j}.type",
            )
    return "\n".join(texts), tuple(images)


# -- answers -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What every response object of one request repeats."""

    id: str
    created: int
    req: p.ResponsesRequest

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        finished: Finished | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``Response`` object, in OpenAI's shape."""
        req = self.req
        fmt: dict[str, Any] = {"type": "text"}
        if req.text is not None and req.text.format is not None:
            fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
        incomplete = status == "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": bool(req.parallel_tool_calls),
            "previous_response_id": None,
            "reasoning": {
                "effort": req.reasoning.effort if req.reasoning else None,
                "summary": None,
            },
            "store": False,
            "temperature": req.temperature,
            "text": {"format": fmt},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": _usage(finished) if finished is not None else None,
            "metadata": req.metadata or {},
            "user": req.user,
        }


def _status(finished: Finished) -> str:
    return "incomplete" if finished.reason == "length" else "completed"


def _usage(finished: Finished) -> dict[str, Any]:
    u = finished.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id or _new_id("call"),
        "name": call.name,
        "arguments": call.arguments_json() if status == "completed" else "",
    }


def response_from(result: Result, head: ResponseHead) -> dict[str, Any]:
    """A whole answer: its reasoning, its message, then its function calls."""
    output: list[dict[str, Any]] = []
    status = _status(result.finished)
    if result.thinking:
        output.append(reasoning_item(_new_id("rs"), result.thinking))
    if result.text or not result.tool_calls:
        output.append(message_item(_new_id("msg"), result.text, status))
    output += [function_call_item(_new_id("fc"), call) for call in result.tool_calls]
    return head.response(status, output, result.finished)


@dataclass(slots=True)
class StreamedResponse:
    """The typed events of one streamed answer, numbered in order.

    ``response.created`` and ``response.in_progress``; for each output item
    ``response.output_item.added``, its parts and deltas
    (``response.output_text.delta``, ``response.reasoning_text.delta``,
    ``response.function_call_arguments.delta``), their ``.done`` events and
    ``response.output_item.done``; then ``response.completed`` (or
    ``response.incomplete`` when ``max_output_tokens`` cut it short).
    """

    head: ResponseHead
    seq: int = 0
    done: list[dict[str, Any]] = field(default_factory=list)  # finished output items
    open: str | None = None  # "message" or "reasoning": the item still receiving text
    open_id: str = ""
    text: str = ""  # the open item's text so far

    def _event(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"type": kind, **data, "sequence_number": self.seq}
        self.seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        response = self.head.response("in_progress", [])
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def events(self, batch: list[StreamEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, group in groupby(batch, key=type):
            events = list(group)
            if kind is TextDelta or kind is ThinkingDelta:
                text = "".join(e.text for e in events)  # type: ignore[union-attr]
                if text:
                    out += self._delta("message" if kind is TextDelta else "reasoning", text)
            elif kind is ToolCallEvent:
                for event in events:
                    out += self._function_call(event.call)  # type: ignore[union-attr]
            elif kind is Finished:
                out += self._finish(events[-1])  # type: ignore[arg-type]
        return out

    def _delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.open != kind:
            out += self._close()
            out += self._open(kind)
        self.text += text
        where = {"item_id": self.open_id, "output_index": len(self.done), "content_index": 0}
        if kind == "message":
            out.append(self._event("response.output_text.delta", **where, delta=text, logprobs=[]))
        else:
            out.append(self._event("response.reasoning_text.delta", **where, delta=text))
        return out

    def _open(self, kind: str) -> list[dict[str, Any]]:
        self.open, self.text = kind, ""
        if kind == "message":
            self.open_id = _new_id("msg")
            item = message_item(self.open_id, None, "in_progress")
            part = _text_part("")
        else:
            self.open_id = _new_id("rs")
            item = reasoning_item(self.open_id, "", "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        index = len(self.done)
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event(
                "response.content_part.added",
                item_id=self.open_id,
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        if self.open is None:
            return []
        where = {"item_id": self.open_id, "output_index": len(self.done), "content_index": 0}
        if self.open == "message":
            item = message_item(self.open_id, self.text, status)
            part = _text_part(self.text)
            done = self._event("response.output_text.done", **where, text=self.text, logprobs=[])
        else:
            item = reasoning_item(self.open_id, self.text)
            part = {"type": "reasoning_text", "text": self.text}
            done = self._event("response.reasoning_text.done", **where, text=self.text)
        out = [
            done,
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=len(self.done), item=item),
        ]
        self.done.append(item)
        self.open = None
        return out

    def _function_call(self, call: ToolCall) -> list[dict[str, Any]]:
        out = self._close()
        item = function_call_item(_new_id("fc"), call)
        index, arguments = len(self.done), item["arguments"]
        where = {"item_id": item["id"], "output_index": index}
        out += [
            self._event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "arguments": ""},
            ),
            self._event("response.function_call_arguments.delta", **where, delta=arguments),
            self._event(
                "response.function_call_arguments.done",
                **where,
                name=call.name,
                arguments=arguments,
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        self.done.append(item)
        return out

    def _finish(self, finished: Finished) -> list[dict[str, Any]]:
        status = _status(finished)
        out: list[dict[str, Any]] = []
        if not self.done and self.open is None:  # nothing said: an empty message, as whole
            out += self._open("message")
        out += self._close(status)
        response = self.head.response(status, list(self.done), finished)
        out.append(self._event(f"response.{status}", response=response))
        return out

    def failed(self, exc: BaseException) -> list[dict[str, Any]]:
        """An ``error`` event and ``response.failed``: how a stream that broke ends."""
        error = classify(exc)
        code = error.code or error.type
        detail = {"code": code, "message": error.message}
        return [
            self._event("error", code=code, message=error.message, param=error.param),
            self._event(
                "response.failed",
                response=self.head.response("failed", list(self.done), error=detail),
            ),
        ]


def sse(event: dict[str, Any]) -> str:
    """One SSE event as OpenAI sends it: its type as the event name, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
