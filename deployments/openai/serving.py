"""The OpenAI API's behaviour, free of HTTP: requests in, responses or SSE text out.

``OpenAIServing`` converts OpenAI requests to engine requests, calls the
``ModelBackend``, and turns engine events back into OpenAI responses and
chunks. Streams are opened before the HTTP response starts, so an error found
up front (unknown model, prompt too long) is an ordinary HTTP error; an error
after the first byte is one SSE error event, after which the stream ends.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from deployments.backend import ModelBackend
from deployments.errors import openai_sse_error
from deployments.generation import Result, answer, embed
from deployments.images import image_from_url
from deployments.openai import protocol as p
from deployments.protocol_base import (
    log_ignored,
    refuse_empty_texts,
    refuse_unsupported,
    stop_sequences,
)
from deployments.replica import StreamEvent
from nodes.chat_output.calls import (
    ToolCall,
    history_calls,
    parse_tool_choice,
    parse_tools,
    think_from_effort,
)
from nodes.engine import (
    IMAGE_MARKER,
    ChatMessage,
    Finished,
    GenerateRequest,
    GenerationEvent,
    SamplingParams,
    TextDelta,
    ThinkingDelta,
    ToolCallEvent,
)
from nodes.errors import InvalidRequest, ModelNotFound
from nodes.models import LocalModel

log = logging.getLogger("corral.openai")

MAX_EMBEDDING_INPUTS = 2048


class OpenAIServing:
    """Chat, text completions, embeddings and the model list, OpenAI style."""

    def __init__(self, backend: ModelBackend) -> None:
        self._backend = backend

    # -- models -----------------------------------------------------------------

    async def list_models(self) -> p.ModelList:
        models = await self._backend.list_models()
        return p.ModelList(data=[_card(m) for m in models])

    async def get_model(self, model_id: str) -> p.ModelCard:
        for m in await self._backend.list_models():
            if m.name == model_id:
                return _card(m)
        raise ModelNotFound(model_id)

    # -- chat -------------------------------------------------------------------

    async def chat(self, req: p.ChatCompletionRequest) -> p.ChatCompletion | AsyncIterator[str]:
        result = await answer(self._backend, req.model, chat_to_engine(req), stream=req.stream)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not isinstance(result, Result):
            return self._stream_sse(result, _ChatChunks(rid, created, req.model, req.include_usage))
        calls = [_tool_call_out(c) for c in result.tool_calls]
        message = p.ChatMessageOut(
            content=None if calls and not result.text else result.text,
            reasoning_content=result.thinking or None,
            tool_calls=calls or None,
        )
        return p.ChatCompletion(
            id=rid,
            created=created,
            model=req.model,
            choices=[
                p.ChatChoice(
                    message=message,
                    finish_reason=finish_reason(result.finished, called=bool(calls)),
                )
            ],
            usage=_usage(result.finished),
        )

    # -- text completions -------------------------------------------------------

    async def completion(self, req: p.CompletionRequest) -> p.Completion | AsyncIterator[str]:
        greq = completion_to_engine(req)
        result = await answer(self._backend, req.model, greq, stream=req.stream)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = greq.prompt if req.echo else ""
        if not isinstance(result, Result):
            chunks = _CompletionChunks(rid, created, req.model, echo, req.include_usage)
            return self._stream_sse(result, chunks)
        return p.Completion(
            id=rid,
            created=created,
            model=req.model,
            choices=[
                p.CompletionChoice(text=echo + result.text, finish_reason=result.finished.reason)
            ],
            usage=_usage(result.finished),
        )

    # -- embeddings -------------------------------------------------------------

    async def embeddings(self, req: p.EmbeddingRequest) -> p.EmbeddingResponse:
        log_ignored(log, req)
        texts = embedding_inputs(req)
        result = await embed(self._backend, req.model, texts, req.keep_alive)
        data = [
            p.EmbeddingData(index=i, embedding=_encode_vector(v, req.encoding_format))
            for i, v in enumerate(result.vectors)
        ]
        usage = p.UsageInfo(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
        return p.EmbeddingResponse(data=data, model=req.model, usage=usage)

    # -- streaming plumbing -----------------------------------------------------

    async def _stream_sse(
        self, stream: AsyncIterator[list[StreamEvent]], chunks: _Chunks
    ) -> AsyncIterator[str]:
        try:
            yield _sse_event(chunks.start())
            async for batch in stream:  # one write per batch: a message, not one per token
                if text := "".join(_sse_event(chunk) for chunk in chunks.events(batch)):
                    yield text
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
            log.warning("stream failed: %s", exc)
            yield openai_sse_error(exc)
        finally:
            await stream.aclose()


# -- request conversion (pure) ------------------------------------------------------


def chat_to_engine(req: p.ChatCompletionRequest) -> GenerateRequest:
    """Turn an OpenAI chat request into an engine request, refusing what we cannot do."""
    log_ignored(log, req)
    tools = parse_tools(req.tools)
    tool_choice = parse_tool_choice(req.tool_choice, tools)
    messages = tuple(_chat_message(i, m) for i, m in enumerate(req.messages))
    fmt = req.response_format
    json_schema = None
    if fmt is not None and fmt.type == "json_schema":
        if not fmt.json_schema or not isinstance(fmt.json_schema.get("schema"), dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be a JSON schema object.",
                param="response_format.json_schema",
            )
        json_schema = fmt.json_schema["schema"]
    params = sampling_params(
        req,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        json_mode=fmt is not None and fmt.type == "json_object",
        json_schema=json_schema,
    )
    return GenerateRequest(
        messages=messages,
        params=params,
        keep_alive=req.keep_alive,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=bool(req.parallel_tool_calls),
        think=think_from_effort(req.reasoning_effort),
    )


def completion_to_engine(req: p.CompletionRequest) -> GenerateRequest:
    """Turn an OpenAI (legacy) completion request into an engine request."""
    log_ignored(log, req)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest(
                "Send one prompt per request (a list of prompts is not supported).",
                param="prompt",
            )
        prompt = prompt[0]
    refuse_unsupported(req, "suffix")
    if req.best_of not in (None, 1):
        raise InvalidRequest("Only best_of=1 is supported.", param="best_of")
    params = sampling_params(req, max_tokens=req.max_tokens)
    return GenerateRequest(prompt=prompt, params=params, keep_alive=req.keep_alive)


def sampling_params(
    req: p.SamplingFields,
    *,
    max_tokens: int | None,
    json_mode: bool = False,
    json_schema: dict | None = None,
) -> SamplingParams:
    """Sampling settings from a request; what it leaves out keeps llama.cpp's default."""
    if req.n != 1:
        raise InvalidRequest("Only n=1 is supported: send one request per completion.", param="n")
    refuse_unsupported(req, "logprobs")
    stop = stop_sequences(req.stop)
    given = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "repeat_penalty": req.repeat_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
    }
    return SamplingParams(
        max_tokens=max_tokens,
        stop=stop,
        json_mode=json_mode,
        json_schema=json_schema,
        **{k: v for k, v in given.items() if v is not None},
    )


def _chat_message(index: int, msg: p.ChatMessageIn) -> ChatMessage:
    content = msg.content
    images: list[bytes] = []
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, p.TextPart):
                parts.append(part.text)
            else:  # an image stands where its part is, among the texts
                param = f"messages.{index}.content.{j}.image_url.url"
                images.append(image_from_url(part.image_url.url, param))
                parts.append(IMAGE_MARKER)
        text = "\n".join(parts)
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    role = "system" if msg.role == "developer" else msg.role
    calls = history_calls(msg.tool_calls, index)
    return ChatMessage(
        role=role,
        content=text,
        tool_calls=calls,
        tool_call_id=(msg.tool_call_id or "") if role == "tool" else "",
        tool_name=(msg.name or "") if role == "tool" else "",
        thinking=msg.reasoning_content or "",
        images=tuple(images),
    )


def embedding_inputs(req: p.EmbeddingRequest) -> list[str]:
    """The texts to embed, refusing token arrays, empty input and too many inputs."""
    if req.dimensions is not None:
        raise InvalidRequest("Choosing embedding dimensions is not supported.", param="dimensions")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise InvalidRequest("input must not be empty.", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("Token arrays are not supported; send text.", param="input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"At most {MAX_EMBEDDING_INPUTS} inputs per request.", param="input")
    refuse_empty_texts(texts)  # type: ignore[arg-type]
    return texts  # type: ignore[return-value]


# -- response building -----------------------------------------------------------------


class _Chunks(Protocol):
    """Builds the chunk objects of one stream."""

    def start(self) -> BaseModel: ...

    def events(self, batch: list[StreamEvent]) -> list[BaseModel]: ...


def finish_reason(finished: Finished, *, called: bool) -> str:
    """OpenAI's finish_reason: "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if called and finished.reason == "stop" else finished.reason


@dataclass(slots=True)
class _ChatChunks:
    id: str
    created: int
    model: str
    include_usage: bool
    called: bool = False

    def events(self, batch: list[StreamEvent]) -> list[p.ChatCompletionChunk]:
        """A batch's chunks: runs of answer or thinking text joined, each tool call as
        OpenAI streams one (index, id, type and name first, then its arguments)."""
        chunks: list[p.ChatCompletionChunk] = []
        for kind, events in _runs(batch):
            if kind is TextDelta:
                chunks.append(self.text("".join(e.text for e in events)))  # type: ignore[union-attr]
            elif kind is ThinkingDelta:
                thought = "".join(e.text for e in events)  # type: ignore[union-attr]
                chunks.append(self._chunk(p.DeltaMessage(reasoning_content=thought)))
            elif kind is ToolCallEvent:
                for event in events:
                    chunks += self._tool_call(event)  # type: ignore[arg-type]
            elif kind is Finished:
                for event in events:
                    chunks += self.finish(event)  # type: ignore[arg-type]
        return chunks

    def _tool_call(self, event: ToolCallEvent) -> list[p.ChatCompletionChunk]:
        self.called = True
        call = event.call
        head = p.DeltaToolCall(
            index=event.index,
            id=call.id,
            type="function",
            function=p.DeltaFunction(name=call.name, arguments=""),
        )
        rest = p.DeltaToolCall(
            index=event.index, function=p.DeltaFunction(arguments=call.arguments_json())
        )
        return [self._chunk(p.DeltaMessage(tool_calls=[d])) for d in (head, rest)]

    def _chunk(self, delta: p.DeltaMessage, finish: str | None = None) -> p.ChatCompletionChunk:
        choice = p.ChatChunkChoice(delta=delta, finish_reason=finish)
        return p.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def start(self) -> p.ChatCompletionChunk:
        return self._chunk(p.DeltaMessage(role="assistant", content=""))

    def text(self, text: str) -> p.ChatCompletionChunk:
        return self._chunk(p.DeltaMessage(content=text))

    def finish(self, event: Finished) -> list[p.ChatCompletionChunk]:
        reason = finish_reason(event, called=self.called)
        chunks = [self._chunk(p.DeltaMessage(), finish=reason)]
        if self.include_usage:
            chunks.append(
                p.ChatCompletionChunk(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=[],
                    usage=_usage(event),
                )
            )
        return chunks


@dataclass(slots=True)
class _CompletionChunks:
    id: str
    created: int
    model: str
    echo: str
    include_usage: bool

    def _chunk(self, text: str, finish: str | None = None) -> p.Completion:
        choice = p.CompletionChoice(text=text, finish_reason=finish)
        return p.Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def start(self) -> p.Completion:
        return self._chunk(self.echo)

    def events(self, batch: list[StreamEvent]) -> list[p.Completion]:
        chunks = []
        if text := "".join(e.text for e in batch if isinstance(e, TextDelta)):
            chunks.append(self.text(text))
        for event in batch:
            if isinstance(event, Finished):
                chunks += self.finish(event)
        return chunks

    def text(self, text: str) -> p.Completion:
        return self._chunk(text)

    def finish(self, event: Finished) -> list[p.Completion]:
        last = self._chunk("", finish=event.reason)
        if self.include_usage:
            last.usage = _usage(event)
        return [last]


def _runs(batch: list[StreamEvent]) -> list[tuple[type, list[GenerationEvent]]]:
    """Consecutive events of one type, together, in order."""
    runs: list[tuple[type, list[GenerationEvent]]] = []
    for event in batch:
        if runs and runs[-1][0] is type(event):
            runs[-1][1].append(event)  # type: ignore[arg-type]
        else:
            runs.append((type(event), [event]))  # type: ignore[list-item]
    return runs


def _tool_call_out(call: ToolCall) -> p.ToolCallOut:
    return p.ToolCallOut(
        id=call.id, function=p.FunctionCallOut(name=call.name, arguments=call.arguments_json())
    )


def _usage(event: Finished) -> p.UsageInfo:
    u = event.usage
    return p.UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def _card(model: LocalModel) -> p.ModelCard:
    return p.ModelCard(id=model.name, created=int(model.modified_at))


def _sse_event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
