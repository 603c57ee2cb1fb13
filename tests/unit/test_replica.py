"""ModelReplica without Serve: queue order, batching, refusals, cancellation."""

from __future__ import annotations

import asyncio
import time

from deployments.replica import Admitted, ModelReplica, Refused
from nodes.engine import (
    ChatMessage,
    EngineSpec,
    Finished,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    load_engine,
)
from nodes.errors import ContextLengthExceeded


def replica(stream_interval: float = 0.0, **options) -> ModelReplica:
    spec = EngineSpec(model="fake", path="", n_ctx=64, engine="fake", options=options)
    return ModelReplica(load_engine(spec), stream_interval=stream_interval)


def request(text: str = "hi", **params) -> GenerateRequest:
    return GenerateRequest(messages=(ChatMessage("user", text),), params=SamplingParams(**params))


async def collect(rep: ModelReplica, req: GenerateRequest) -> list[tuple[float, list]]:
    """Each message of a stream with the time it arrived."""
    return [(time.perf_counter(), batch) async for batch in rep.generate(req)]


def test_a_stream_is_admitted_then_text_then_finished():
    messages = asyncio.run(collect(replica(token_delay=0), request(max_tokens=5)))
    batches = [batch for _, batch in messages]
    assert batches[0] == [Admitted()]
    events = [e for batch in batches[1:] for e in batch]
    assert [type(e) for e in events] == [TextDelta] * 5 + [Finished]
    assert events[-1].usage.completion_tokens == 5


def test_tokens_are_batched_by_the_stream_interval_but_the_first_goes_at_once():
    async def run():
        rep = replica(stream_interval=0.1, token_delay=0.01, reply_tokens=30)
        started = time.perf_counter()
        return started, await collect(rep, request())

    started, messages = asyncio.run(run())
    text_messages = [(t, b) for t, b in messages if any(isinstance(e, TextDelta) for e in b)]
    first_at, first = text_messages[0]
    assert len([e for e in first if isinstance(e, TextDelta)]) == 1  # not held back
    assert first_at - started < 0.1
    # 30 tokens over ~0.3 s at one message per 0.1 s: a handful of messages, not 30.
    assert 2 <= len(text_messages) <= 6


def test_without_an_interval_each_token_is_its_own_message():
    messages = asyncio.run(collect(replica(stream_interval=0, token_delay=0.01), request()))
    sizes = [len(b) for _, b in messages[1:]]
    assert sum(sizes) == 17 and max(sizes) <= 2  # 16 tokens and Finished


def test_requests_run_one_at_a_time_in_arrival_order():
    async def run():
        rep = replica(token_delay=0.005, reply_tokens=10)
        order = []

        async def one(i: int) -> None:
            await asyncio.sleep(0.01 * i)
            async for batch in rep.generate(request(f"r{i}")):
                if any(isinstance(e, Finished) for e in batch):
                    order.append(i)

        await asyncio.gather(*(one(i) for i in range(4)))
        return order, await rep.stats()

    order, stats = asyncio.run(run())
    assert order == [0, 1, 2, 3]
    assert (stats.pending, stats.finished, stats.cancelled) == (0, 4, 0)


def test_a_prompt_that_cannot_run_is_refused_as_data():
    async def run():
        return [b async for b in replica().generate(request("w " * 100))]

    (only,) = asyncio.run(run())
    assert isinstance(only[0], Refused) and isinstance(only[0].error, ContextLengthExceeded)


def test_a_caller_that_stops_reading_cancels_its_generation():
    async def run():
        rep = replica(token_delay=0.01, reply_tokens=500)
        stream = rep.generate(request())
        await anext(stream)  # Admitted
        await anext(stream)  # some text
        await stream.aclose()  # the client went away
        for _ in range(100):
            stats = await rep.stats()
            if stats.pending == 0 and stats.cancelled == 1:
                return stats
            await asyncio.sleep(0.02)
        return await rep.stats()

    stats = asyncio.run(run())
    assert (stats.pending, stats.cancelled, stats.finished) == (0, 1, 0)
