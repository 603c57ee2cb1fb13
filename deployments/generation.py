"""What every API does with a generation, whatever its wire format.

``open_generation`` starts one and waits until the replica admits it, so that
the errors found up front (unknown model, prompt too long, load failure) raise
before any byte of the response is sent and become ordinary HTTP errors.
``gather`` collects a whole answer for the non-streaming responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from deployments.backend import ModelBackend
from deployments.replica import Admitted, Refused, StreamEvent
from nodes.engine import Finished, GenerateRequest, TextDelta

Stream = AsyncIterator[list[StreamEvent]]


@dataclass(slots=True)
class Result:
    """A whole generation, gathered from its events."""

    text: str
    finished: Finished


async def open_generation(backend: ModelBackend, model: str, greq: GenerateRequest) -> Stream:
    """The generation's stream, once its first event says the replica admitted it."""
    stream = backend.generate(model, greq)
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    if first and isinstance(first[0], Admitted):
        return stream
    await stream.aclose()
    if first and isinstance(first[0], Refused):
        raise first[0].error
    raise RuntimeError(f"replica stream began with {first!r}, not Admitted")


async def gather(stream: Stream) -> Result:
    """The text and the ``Finished`` event of a whole generation; closes the stream."""
    parts: list[str] = []
    finished: Finished | None = None
    try:
        async for batch in stream:
            for event in batch:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    finished = event
    finally:
        await stream.aclose()
    if finished is None:
        raise RuntimeError("the replica's stream ended without a Finished event")
    return Result(text="".join(parts), finished=finished)
