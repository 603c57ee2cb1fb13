"""ModelReplica without Serve: queue order, batching, refusals, cancellation."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from deployments.replica import Admitted, ModelReplica, Refused, engine_executor, stream_spacing
from nodes.engine import (
    ChatMessage,
    Embeddings,
    Engine,
    EngineSpec,
    Finished,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    load_engine,
)
from nodes.errors import ContextLengthExceeded
from nodes.fake_engine import EngineFault


def replica(stream_interval: float = 0.0, parallel: int = 1, **options) -> ModelReplica:
    spec = EngineSpec(
        model="fake", path="", n_ctx=64, engine="fake", options=options, parallel=parallel
    )
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


def timed_stream(**options) -> tuple[float, list[tuple[float, list]]]:
    """When a stream of a new ``replica(**options)`` began, and its messages (timed)."""

    async def run():
        rep = replica(**options)
        started = time.perf_counter()
        return started, await collect(rep, request())

    return asyncio.run(run())


def test_tokens_are_batched_by_the_stream_interval_but_the_first_goes_at_once():
    started, messages = timed_stream(stream_interval=0.1, token_delay=0.01, reply_tokens=30)
    text_messages = [(t, b) for t, b in messages if any(isinstance(e, TextDelta) for e in b)]
    first_at, first = text_messages[0]
    assert len([e for e in first if isinstance(e, TextDelta)]) == 1  # not held back
    assert first_at - started < 0.1
    # 30 tokens over ~0.3 s at one message per 0.1 s: a handful of messages, not 30.
    assert 2 <= len(text_messages) <= 6


def test_the_interval_grows_with_the_streams_running():
    assert stream_spacing(0.05, 0) == stream_spacing(0.05, 1) == 0.05
    assert stream_spacing(0.05, 2) == pytest.approx(0.1)
    assert stream_spacing(0.05, 3) == stream_spacing(0.05, 8) == pytest.approx(0.15)
    assert stream_spacing(0.0, 4) == 0.0


def test_the_end_of_a_stream_is_not_held_back_by_the_interval():
    started, messages = timed_stream(stream_interval=0.5, token_delay=0.01, reply_tokens=5)
    ended_at, last = messages[-1]
    assert isinstance(last[-1], Finished)
    # five tokens take ~0.05 s; the 0.5 s interval would hold the last message until 0.5 s
    assert ended_at - started < 0.4


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


def test_a_replica_with_slots_runs_that_many_at_once_and_queues_the_rest():
    async def run():
        rep = replica(parallel=2, token_delay=0.02, reply_tokens=10)
        started: dict[int, float] = {}
        loads = []

        async def one(i: int) -> None:
            await asyncio.sleep(0.005 * i)
            async for batch in rep.generate(request(f"r{i}")):
                if any(isinstance(e, TextDelta) for e in batch):
                    started.setdefault(i, time.perf_counter())
                    loads.append(rep.load())

        await asyncio.gather(*(one(i) for i in range(4)))
        return started, loads

    started, loads = asyncio.run(run())
    # the first two start together; the last two only once a slot is free
    assert max(started[0], started[1]) < min(started[2], started[3])
    assert all(load.slots == 2 for load in loads)
    assert max(load.queued for load in loads) == 2 and max(load.in_flight for load in loads) == 4


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


# --- load(): what a replica reports to the controller -------------------------------


def fake_engine(**options) -> Engine:
    return load_engine(EngineSpec(model="fake", path="", n_ctx=64, engine="fake", options=options))


@pytest.fixture
def make_replica() -> Iterator[Callable[..., ModelReplica]]:
    """Replicas whose engine threads are shut down at the end of the test, so that no
    work of one test still runs in the next."""
    made: list[tuple[ModelReplica, ThreadPoolExecutor]] = []

    def make(engine: Engine | None = None, **options) -> ModelReplica:
        executor = engine_executor()
        rep = ModelReplica(engine or fake_engine(**options), executor)
        made.append((rep, executor))
        return rep

    yield make
    for _, executor in made:
        executor.shutdown(wait=True)
    made.clear()


def test_a_fresh_replica_is_idle_since_it_loaded_with_no_keep_alive_of_its_own():
    load = replica().load()
    assert load.pending == {} and load.in_flight == 0
    assert load.idle_for is not None and 0 <= load.idle_for < 5
    assert load.keep_alive is None


def test_load_counts_the_requests_held_by_origin_while_they_run(make_replica):
    rep = make_replica(token_delay=0.01, reply_tokens=500)

    async def run():
        streams = [rep.generate(request(f"r{i}"), origin=o) for i, o in enumerate("aab")]
        for stream in streams:
            assert await anext(stream) == [Admitted()]  # counted from here on
        during = rep.load()
        await streams[0].aclose()  # one of a's goes away
        one_left = rep.load()
        for stream in streams[1:]:
            await stream.aclose()
        return during, one_left, rep.load()

    during, one_left, after = asyncio.run(run())
    assert during.pending == {"a": 2, "b": 1} and during.in_flight == 3
    assert during.idle_for is None  # busy
    assert one_left.pending == {"a": 1, "b": 1} and one_left.idle_for is None
    assert after.pending == {}  # no origin left behind at 0
    assert after.idle_for is not None


def test_load_counts_a_generation_waiting_in_the_queue(make_replica):
    rep = make_replica(token_delay=0.01, reply_tokens=500)

    async def run():
        first = rep.generate(request("one"), origin="a")
        await anext(first)
        await anext(first)  # running: text came
        waiting = rep.generate(request("two"), origin="b")
        await anext(waiting)  # admitted, queued behind the first
        load = rep.load()
        await first.aclose()
        await waiting.aclose()
        return load

    load = asyncio.run(run())
    assert load.pending == {"a": 1, "b": 1} and load.idle_for is None


def test_idle_for_is_none_while_busy_and_grows_once_idle(make_replica):
    rep = make_replica(token_delay=0.002, reply_tokens=20)

    async def run():
        seen = []
        async for _ in rep.generate(request(), origin="a"):
            seen.append(rep.load().idle_for)
        first = rep.load().idle_for
        await asyncio.sleep(0.05)
        return seen, first, rep.load().idle_for

    seen, first, later = asyncio.run(run())
    assert seen and all(idle_for is None for idle_for in seen)
    assert first is not None and 0 <= first < 0.05  # idle since the request ended
    assert later is not None and later >= first + 0.04


def test_keep_alive_is_the_last_requests(make_replica):
    rep = make_replica(token_delay=0, reply_tokens=3)

    async def run():
        seen = []
        for keep_alive in (30.0, 0.0, None, math.inf):
            async for _ in rep.generate(replace(request(), keep_alive=keep_alive)):
                pass
            seen.append(rep.load().keep_alive)
        return seen

    assert asyncio.run(run()) == [30.0, 0.0, None, math.inf]


def test_keep_alive_while_two_run_is_the_later_ones(make_replica):
    rep = make_replica(token_delay=0.01, reply_tokens=500)

    async def run():
        first = rep.generate(replace(request("one"), keep_alive=600.0), origin="a")
        await anext(first)
        second = rep.generate(replace(request("two"), keep_alive=5.0), origin="a")
        await anext(second)
        during = rep.load()
        await first.aclose()  # the first ends after the second began
        after_first = rep.load()
        await second.aclose()
        return during, after_first

    during, after_first = asyncio.run(run())
    assert during.keep_alive == 5.0 and during.pending == {"a": 2}
    assert after_first.keep_alive == 5.0 and after_first.pending == {"a": 1}


def test_a_refused_request_is_not_counted(make_replica):
    rep = make_replica()

    async def run():
        return [b async for b in rep.generate(replace(request("w " * 100), keep_alive=9.0))]

    batches = asyncio.run(run())
    assert isinstance(batches[0][0], Refused)
    load = rep.load()
    assert load.pending == {} and load.idle_for is not None
    assert load.keep_alive is None  # a request that never ran asks for nothing


def test_a_failed_generation_is_no_longer_counted(make_replica):
    rep = make_replica(token_delay=0, reply_tokens=10, fail_after=2)

    async def run():
        with pytest.raises(EngineFault):
            async for _ in rep.generate(request(), origin="a"):
                pass

    asyncio.run(run())
    load = rep.load()
    assert load.pending == {} and load.idle_for is not None


def test_embed_is_counted_by_origin_with_its_keep_alive(make_replica):
    engine = fake_engine()
    gate = threading.Event()
    embed = engine.embed

    def held_embed(texts):
        gate.wait(5)  # the test looks at the load meanwhile
        return embed(texts)

    engine.embed = held_embed
    rep = make_replica(engine)

    async def run():
        task = asyncio.create_task(rep.embed(["a text"], origin="c", keep_alive=60.0))
        await asyncio.sleep(0)  # the task runs up to waiting for the engine
        during = rep.load()
        gate.set()
        return during, await task, rep.load()

    try:
        during, result, after = asyncio.run(run())
    finally:
        gate.set()
    assert during.pending == {"c": 1} and during.idle_for is None
    assert during.keep_alive == 60.0
    assert isinstance(result, Embeddings) and len(result.vectors) == 1
    assert after.pending == {} and after.idle_for is not None
    assert after.keep_alive == 60.0


def test_embed_and_generate_from_one_origin_add_up(make_replica):
    rep = make_replica(token_delay=0.01, reply_tokens=500)

    async def run():
        stream = rep.generate(request(), origin="x")
        await anext(stream)  # admitted: the engine thread is busy generating
        task = asyncio.create_task(rep.embed(["t"], origin="x"))  # waits behind it
        await asyncio.sleep(0)
        both = rep.load()
        await stream.aclose()
        await task
        return both, rep.load()

    both, after = asyncio.run(run())
    assert both.pending == {"x": 2} and both.in_flight == 2
    assert after.pending == {}


def test_a_load_change_sets_the_changed_flag(make_replica):
    rep = make_replica(token_delay=0.01, reply_tokens=500)

    async def run():
        rep.changed.clear()
        stream = rep.generate(request(), origin="a")
        await anext(stream)
        began = rep.changed.is_set()
        rep.changed.clear()
        await stream.aclose()
        return began, rep.changed.is_set()

    assert asyncio.run(run()) == (True, True)


def test_a_replica_dropped_on_its_engine_thread_still_closes_its_engine():
    # What happens when a client goes away and the replica is dropped before the
    # cancelled work has wound down: that work holds the last reference, so the
    # replica is collected on the engine thread.
    closed = threading.Event()
    engine = fake_engine()
    engine.close = closed.set
    executor = engine_executor()
    rep = ModelReplica(engine, executor)
    gate = threading.Event()
    executor.submit(lambda held: gate.wait(5), rep)  # the engine thread holds it
    del rep
    errors = []
    hook, sys.unraisablehook = sys.unraisablehook, errors.append
    try:
        gate.set()
        deadline = time.monotonic() + 2
        while not (closed.is_set() or errors) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert closed.is_set(), f"engine not closed; __del__ raised {errors}"
    finally:
        sys.unraisablehook = hook
        gate.set()
