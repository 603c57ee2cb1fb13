"""What every API does with a generation or an embedding, whatever its wire format.

``open_generation`` starts one and waits until the replica admits it, so that
the errors found up front (unknown model, prompt too long, load failure) raise
before any byte of the response is sent and become ordinary HTTP errors.
``gather`` collects a whole answer for the non-streaming responses; ``embed``
returns vectors or raises the replica's refusal.

Both APIs come through here, so this is where the metrics of a generation are
recorded (``deployments/metrics.py``): its time to first token, counted from
the request's arrival, its tokens and its decode speed, whether it is streamed
or gathered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from ray.exceptions import RayActorError

from deployments.backend import ModelBackend
from deployments.context import current_request
from deployments.metrics import ApiMetrics, recording
from deployments.replica import Admitted, Refused, StreamEvent
from nodes.chat_output.calls import ToolCall
from nodes.engine import (
    Embeddings,
    Finished,
    GenerateRequest,
    TextDelta,
    ThinkingDelta,
    ToolCallEvent,
)
from nodes.errors import InvalidRequest

log = logging.getLogger("corral.generation")

Stream = AsyncIterator[list[StreamEvent]]


@dataclass(slots=True)
class Result:
    """A whole generation, gathered from its events."""

    text: str
    finished: Finished
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


async def open_generation(backend: ModelBackend, model: str, greq: GenerateRequest) -> Stream:
    """The generation's stream, once its first event says the replica admitted it."""
    ctx = current_request()
    started = ctx.started if ctx is not None else time.perf_counter()
    stream = backend.generate(model, greq)
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    if first and isinstance(first[0], Admitted):
        metrics = recording()
        return stream if metrics is None else _Measured(stream, metrics, model, started)
    await stream.aclose()
    if first and isinstance(first[0], Refused):
        raise first[0].error
    raise RuntimeError(f"replica stream began with {first!r}, not Admitted")


async def open_thinking_if_able(
    backend: ModelBackend, model: str, greq: GenerateRequest
) -> tuple[Stream, GenerateRequest]:
    """``open_generation``, but a model that cannot think answers without thinking instead
    of refusing; and the request that was opened (to open again, see ``gather``).

    Agents on the Anthropic and Responses APIs (Claude Code, Codex) ask every model to
    think; Ollama relaxes ``think`` on those routes the same way.
    """
    try:
        return await open_generation(backend, model, greq), greq
    except InvalidRequest as exc:
        if exc.param != "think" or greq.think in (None, False):
            raise
    log.info("%s cannot think: answering without thinking", model)
    relaxed = replace(greq, think=None)
    return await open_generation(backend, model, relaxed), relaxed


class _Measured:
    """A generation's stream that records its metrics as its events pass.

    A class rather than an async generator so that ``aclose`` reaches the
    backend's stream (and so cancels the generation) even if nobody iterated.
    """

    def __init__(self, stream: Stream, metrics: ApiMetrics, model: str, started: float) -> None:
        self._stream = stream
        self._metrics = metrics
        self._model = model
        self._started = started  # perf_counter() when the request arrived
        self._output_seen = False

    def __aiter__(self) -> _Measured:
        return self

    async def __anext__(self) -> list[StreamEvent]:
        batch = await anext(self._stream)
        for event in batch:
            output = TextDelta | ThinkingDelta | ToolCallEvent | Finished
            if isinstance(event, output) and not self._output_seen:
                self._output_seen = True
                self._metrics.first_token(self._model, time.perf_counter() - self._started)
            if isinstance(event, Finished):
                self._metrics.finished(self._model, event)
        return batch

    async def aclose(self) -> None:
        await self._stream.aclose()


async def gather(stream: Stream, again: Callable[[], Awaitable[Stream]] | None = None) -> Result:
    """The text and the ``Finished`` event of a whole generation; closes the stream.

    If the replica dies midway, nothing has reached the client yet: ``again`` (when
    given) opens the generation anew, on another placement, once. A second death of the
    request's replica (the backend counts them per request) is final.
    """
    try:
        return await _gather(stream)
    except RayActorError as exc:
        if again is None:
            raise
        log.warning("the replica died before the answer was whole; running it again: %r", exc)
        return await _gather(await again())


async def _gather(stream: Stream) -> Result:
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    finished: Finished | None = None
    try:
        async for batch in stream:
            for event in batch:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, ThinkingDelta):
                    thoughts.append(event.text)
                elif isinstance(event, ToolCallEvent):
                    calls.append(event.call)
                elif isinstance(event, Finished):
                    finished = event
    finally:
        await stream.aclose()
    if finished is None:
        raise RuntimeError("the replica's stream ended without a Finished event")
    return Result("".join(parts), finished, "".join(thoughts), calls)


async def embed(
    backend: ModelBackend, model: str, texts: Sequence[str], keep_alive: float | None
) -> Embeddings:
    """One vector per text; the replica's refusal (input it cannot take) raises."""
    result = await backend.embed(model, texts, keep_alive)
    if isinstance(result, Refused):
        raise result.error
    if (metrics := recording()) is not None:
        metrics.embedded(model, result.prompt_tokens)
    return result
