"""The stream-or-gather step every API takes, and what it does with a run that starts over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from ray.exceptions import RayActorError

from deployments.dispatch import MOVES, Restarted, Retries
from deployments.generation import Generation, Result, answer
from deployments.replica import Admitted, Refused
from nodes.engine import Finished, GenerateRequest, TextDelta, Timings, Usage
from nodes.errors import InvalidRequest, ServiceUnavailable

DONE = Finished("stop", Usage(3, 2), Timings())
DEATH = RayActorError()


class Scripted:
    """A backend whose ``generate`` yields the batches it is given, and says if closed."""

    def __init__(self, *batches: list) -> None:
        self.batches = batches
        self.closed = False
        self.asked: list[GenerateRequest] = []

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[list]:
        self.asked.append(request)
        try:
            for batch in self.batches:
                yield batch
        finally:
            self.closed = True


def run(coro):
    return asyncio.run(coro)


def test_a_gathered_answer_is_the_run_after_a_restart():
    backend = Scripted(
        [Admitted()], [TextDelta("half")], [Restarted(DEATH)], [TextDelta("whole")], [DONE]
    )
    result = run(answer(backend, "m", GenerateRequest(prompt="hi"), stream=False))
    assert isinstance(result, Result) and (result.text, result.finished) == ("whole", DONE)
    assert backend.closed


def test_a_stream_fails_with_the_death_when_its_run_starts_over():
    backend = Scripted([Admitted()], [TextDelta("half")], [Restarted(DEATH)], [DONE])

    async def consume() -> list:
        generation = await answer(backend, "m", GenerateRequest(prompt="hi"), stream=True)
        assert isinstance(generation, Generation)
        seen = []
        try:
            async for batch in generation:
                seen.append(batch)
        finally:
            await generation.aclose()
        return seen

    with pytest.raises(RayActorError):
        run(consume())
    assert backend.closed


def test_a_refusal_raises_before_anything_is_sent():
    refusal = InvalidRequest("too long", param="messages")
    backend = Scripted([Refused(refusal)])
    with pytest.raises(InvalidRequest, match="too long"):
        run(answer(backend, "m", GenerateRequest(prompt="hi"), stream=True))
    assert backend.closed


def test_a_model_that_cannot_think_answers_without_thinking_when_relaxed():
    class NoThinking(Scripted):
        async def generate(self, model, request):
            if request.think:
                self.asked.append(request)
                yield [Refused(InvalidRequest("no thinking", param="think"))]
                return
            async for batch in super().generate(model, request):
                yield batch

    backend = NoThinking([Admitted()], [TextDelta("ok")], [DONE])
    greq = GenerateRequest(prompt="hi", think=True)
    with pytest.raises(InvalidRequest):
        run(answer(backend, "m", greq, stream=False))
    result = run(answer(backend, "m", greq, stream=False, relax_think=True))
    assert result.text == "ok" and backend.asked[-1].think is None


def test_a_request_moves_at_most_MOVES_times():
    retries = Retries("m")
    for i in range(MOVES + 1):
        assert retries.next_try() == frozenset(f"p{j}" for j in range(i))
        retries.moved(f"p{i}")
    with pytest.raises(ServiceUnavailable, match="placements failed or went away"):
        retries.next_try()
