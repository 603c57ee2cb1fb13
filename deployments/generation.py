"""What every API does with a generation or an embedding, whatever its wire format.

``answer`` is the one step every API's serving takes: open the generation and
wait until the replica admits it, so that the errors found up front (unknown
model, prompt too long, load failure) raise before any byte of the response is
sent and become ordinary HTTP errors; then hand back the ``Generation`` to
stream, or the whole ``Result`` gathered from it. ``embed`` returns vectors or
raises the replica's refusal.

When a replica dies after the request produced output, the dispatcher
(``deployments/dispatch.py``) runs it again elsewhere, after a ``[Restarted]``
batch: a gathered answer drops what it had and takes the new run's, since
nothing reached the client yet; a stream has already sent that output, so it
fails there with the replica's death.

Every API comes through here, so this is where the metrics of a generation are
recorded (``deployments/metrics.py``): its time to first token, counted from
the request's arrival, its tokens and its decode speed, whether it is streamed
or gathered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, overload

from deployments.backend import ModelBackend
from deployments.context import current_request
from deployments.dispatch import Restarted
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

Batches = AsyncIterator[list[StreamEvent | Restarted]]


@dataclass(slots=True)
class Result:
    """A whole generation, gathered from its events."""

    text: str
    finished: Finished
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    admitted: float = 0.0  # perf_counter() when the replica admitted the request


@overload
async def answer(
    backend: ModelBackend,
    model: str,
    greq: GenerateRequest,
    *,
    stream: Literal[False],
    relax_think: bool = False,
) -> Result: ...


@overload
async def answer(
    backend: ModelBackend,
    model: str,
    greq: GenerateRequest,
    *,
    stream: bool,
    relax_think: bool = False,
) -> Generation | Result: ...


async def answer(
    backend: ModelBackend,
    model: str,
    greq: GenerateRequest,
    *,
    stream: bool,
    relax_think: bool = False,
) -> Generation | Result:
    """Open the generation (up-front errors raise here); then the ``Generation`` to stream
    when ``stream``, else its whole ``Result``.

    ``relax_think``: a model that cannot think answers without thinking instead of
    refusing. Agents on the Anthropic and Responses APIs (Claude Code, Codex) ask every
    model to think; Ollama relaxes ``think`` on those routes the same way.
    """
    if relax_think:
        generation = await _open_thinking_if_able(backend, model, greq)
    else:
        generation = await open_generation(backend, model, greq)
    return generation if stream else await gather(generation)


async def open_generation(backend: ModelBackend, model: str, greq: GenerateRequest) -> Generation:
    """The generation, once its first event says the replica admitted it."""
    ctx = current_request()
    started = ctx.started if ctx is not None else time.perf_counter()
    batches: Batches = backend.generate(model, greq)
    try:
        first = await anext(batches)
    except BaseException:
        await batches.aclose()
        raise
    if first and isinstance(first[0], Admitted):
        return Generation(batches, recording(), model, started)
    await batches.aclose()
    if first and isinstance(first[0], Refused):
        raise first[0].error
    raise RuntimeError(f"replica stream began with {first!r}, not Admitted")


async def _open_thinking_if_able(
    backend: ModelBackend, model: str, greq: GenerateRequest
) -> Generation:
    try:
        return await open_generation(backend, model, greq)
    except InvalidRequest as exc:
        if exc.param != "think" or greq.think in (None, False):
            raise
    log.info("%s cannot think: answering without thinking", model)
    return await open_generation(backend, model, replace(greq, think=None))


class Generation:
    """An admitted generation's batches, recording its metrics as they pass.

    Iterated, it is what a stream sends: a ``[Restarted]`` raises the replica's death,
    since the output already sent cannot be taken back. ``batches()`` passes it on, for
    ``gather``. A class rather than an async generator so that ``aclose`` reaches the
    backend's stream (and so cancels the generation) even if nobody iterated.
    """

    def __init__(
        self, batches: Batches, metrics: ApiMetrics | None, model: str, started: float
    ) -> None:
        self._batches = batches
        self._metrics = metrics
        self._model = model
        self._started = started  # perf_counter() when the request arrived
        self._output_seen = False
        self.admitted = time.perf_counter()  # when the replica took it (after any cold start)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> list[StreamEvent]:
        batch = await self._next()
        if batch and isinstance(batch[0], Restarted):
            raise batch[0].error
        return batch  # type: ignore[return-value]

    async def batches(self) -> Batches:
        """Every batch, ``[Restarted]`` included."""
        while True:
            try:
                yield await self._next()
            except StopAsyncIteration:
                return

    async def _next(self) -> list[StreamEvent | Restarted]:
        batch = await anext(self._batches)
        if self._metrics is None:
            return batch
        for event in batch:
            output = TextDelta | ThinkingDelta | ToolCallEvent | Finished
            if isinstance(event, output) and not self._output_seen:
                self._output_seen = True
                self._metrics.first_token(self._model, time.perf_counter() - self._started)
            if isinstance(event, Finished):
                self._metrics.finished(self._model, event)
        return batch

    async def aclose(self) -> None:
        await self._batches.aclose()


async def gather(generation: Generation) -> Result:
    """The text and the ``Finished`` event of a whole generation; closes it. A run that
    starts over (``[Restarted]``) replaces what the earlier one gave."""
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    finished: Finished | None = None
    try:
        async for batch in generation.batches():
            for event in batch:
                if isinstance(event, Restarted):
                    log.warning("the replica died before the answer was whole: %r", event.error)
                    parts, thoughts, calls, finished = [], [], [], None
                elif isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, ThinkingDelta):
                    thoughts.append(event.text)
                elif isinstance(event, ToolCallEvent):
                    calls.append(event.call)
                elif isinstance(event, Finished):
                    finished = event
    finally:
        await generation.aclose()
    if finished is None:
        raise RuntimeError("the replica's stream ended without a Finished event")
    return Result("".join(parts), finished, "".join(thoughts), calls, generation.admitted)


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
