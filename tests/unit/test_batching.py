"""The batching engine on the real starter model: several requests decode together in
one context and answer as each would alone; caches are reused; a full cache makes a
request wait, never fail."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nodes.engine import (
    ChatMessage,
    EngineSpec,
    Finished,
    GenerateRequest,
    LlamaSettings,
    SamplingParams,
    TextDelta,
    load_engine,
)

PROMPTS = [
    "Write a short poem about the sea.",
    "List three fruits.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a bicycle is.",
]


def chat(text: str, **params) -> GenerateRequest:
    return GenerateRequest(messages=(ChatMessage("user", text),), params=SamplingParams(**params))


def run(engine, request: GenerateRequest, cancel: threading.Event | None = None):
    events = list(
        engine.generate(engine.encode(request), request.params, cancel or threading.Event())
    )
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def together(engine, requests: list[GenerateRequest]):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: run(engine, r), requests))


def engine_of(path: Path, **spec):
    return load_engine(EngineSpec(model="smollm2:135m", path=str(path), n_threads=2, **spec))


@pytest.fixture(scope="module")
def four(starter_path: Path):
    engine = engine_of(starter_path, n_ctx=2048, parallel=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def split(starter_path: Path):
    """Four slots, each with its own part of the cache (``unified_kv`` off)."""
    engine = engine_of(starter_path, n_ctx=2560, parallel=4, llama=LlamaSettings(unified_kv=False))
    yield engine
    engine.close()


def test_greedy_answers_together_equal_the_answers_alone(split, starter_path):
    requests = [chat(p, temperature=0, max_tokens=40) for p in PROMPTS]
    alone = engine_of(starter_path, n_ctx=1024, parallel=1, llama=LlamaSettings(unified_kv=False))
    try:
        expected = [run(alone, r)[0] for r in requests]
    finally:
        alone.close()
    got = together(split, requests)
    assert [text for text, _ in got] == expected
    assert all(done.reason in ("stop", "length") for _, done in got)


def test_seeded_samples_together_equal_the_samples_alone(split):
    requests = [chat(p, temperature=0.9, seed=7 + i, max_tokens=24) for i, p in enumerate(PROMPTS)]
    alone = [run(split, r)[0] for r in requests]
    assert [text for text, _ in together(split, requests)] == alone


def test_a_shared_cache_serves_requests_together_and_one_may_use_all_of_it(four):
    # In one shared cache a sequence's cells lie between others', so llama.cpp sums in
    # another order and a near-tie may tip another way: the answers are the model's
    # own, not necessarily the very tokens each gets alone (see LlamaSettings.unified_kv).
    got = together(four, [chat(p, temperature=0, max_tokens=40) for p in PROMPTS])
    assert all(text and done.reason in ("stop", "length") for text, done in got)
    assert four.info.n_ctx == 2048  # one request may use every cell


def test_each_slot_keeps_its_own_grammar(four):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    requests = [
        chat("Describe Paris as JSON.", temperature=0, max_tokens=60, json_schema=schema),
        chat("Tell me about Paris.", temperature=0, max_tokens=30),
        chat(
            "Give me a JSON object with a dog's name.",
            temperature=0,
            max_tokens=200,
            json_mode=True,
        ),
    ]
    (shaped, done), (free, _), (mode, done2) = together(four, requests)
    assert done.reason == "stop" and set(json.loads(shaped)) == {"city", "population"}
    assert not free.lstrip().startswith("{")
    if done2.reason == "stop":  # a small model may write an object longer than 200 tokens
        assert isinstance(json.loads(mode), dict)
    else:
        assert mode.lstrip().startswith("{")


def next_turn(answer: str, max_tokens: int) -> GenerateRequest:
    """The second turn of the conversation ``chat("Name a colour.")`` began."""
    return GenerateRequest(
        messages=(
            ChatMessage("user", "Name a colour."),
            ChatMessage("assistant", answer),
            ChatMessage("user", "And another one?"),
        ),
        params=SamplingParams(temperature=0, max_tokens=max_tokens),
    )


def test_the_next_turn_reuses_the_cached_conversation(four):
    first = chat("Name a colour.", temperature=0, max_tokens=12)
    answer, _ = run(four, first)
    before = dict(four._batcher.counters)
    second = next_turn(answer, 12)
    tokens = four.encode(second)
    run(four, second)
    reused = four._batcher.counters["prompt_reused"] - before["prompt_reused"]
    evaluated = four._batcher.counters["prompt_evaluated"] - before["prompt_evaluated"]
    assert reused + evaluated == len(tokens)
    assert reused > len(four.encode(first)), "the whole first turn came from the cache"


def test_a_conversation_that_lost_its_slot_comes_back_from_ram(starter_path):
    # One slot: another request takes it between two turns, so turn 1 is saved to RAM
    # and copied back for turn 2, which then reads only what is new; the answer is the
    # one an engine without the cache gives.
    def turns(engine):
        first = chat("Name a colour.", temperature=0, max_tokens=12)
        answer, _ = run(engine, first)
        run(engine, chat("List three fruits.", temperature=0, max_tokens=12))
        second = next_turn(answer, 24)
        before = dict(engine._batcher.counters)
        text, _ = run(engine, second)
        reused = engine._batcher.counters["prompt_reused"] - before["prompt_reused"]
        return text, reused, len(engine.encode(first))

    engine = engine_of(starter_path, n_ctx=1024, parallel=1)
    try:
        text, reused, first_turn = turns(engine)
        saved = engine._batcher.prompt_cache
        assert saved is not None and saved.counters["restored"] >= 1
        assert reused > first_turn, "the whole first turn came back from RAM"
        assert 0 < saved.bytes and saved.tokens <= saved.limit == 1024 // 4
    finally:
        engine.close()
    without = engine_of(starter_path, n_ctx=1024, parallel=1, llama=LlamaSettings(prompt_cache=0))
    try:
        plain, reused_plain, _ = turns(without)
        assert without._batcher.prompt_cache is None
        assert reused_plain < reused, "without the cache, turn 1 is read again"
    finally:
        without.close()
    assert text == plain


def test_a_cancelled_request_frees_its_slot_for_the_next(four):
    cancels = [threading.Event() for _ in range(4)]
    requests = [
        chat(f"Count from 1 to 500, number {i}.", temperature=0, max_tokens=200) for i in range(4)
    ]
    streams = [
        four.generate(four.encode(r), r.params, c) for r, c in zip(requests, cancels, strict=True)
    ]
    firsts = [next(s) for s in streams]  # all four slots are decoding
    assert all(isinstance(e, TextDelta) for e in firsts)
    cancels[0].set()
    rest = list(streams[0])
    assert rest[-1].reason == "cancelled"
    text, done = run(four, chat("What is 2+2?", temperature=0, max_tokens=8))
    assert done.reason in ("stop", "length") and text  # a fifth request got the freed slot
    for cancel, stream in zip(cancels[1:], streams[1:], strict=True):
        cancel.set()
        assert list(stream)[-1].reason == "cancelled"
    wait_until(lambda: four._batcher.busy_slots() == 0)  # freed at the loop's next step


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.01)


def test_embeddings_run_in_the_same_context_between_generations(four):
    request = chat(PROMPTS[0], temperature=0, max_tokens=40)
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(run, four, request)
        vectors = four.embed(["The cat sits on the mat.", "A cat is on a mat."]).vectors
        text, done = answer.result()
    assert len(vectors) == 2 and len(vectors[0]) == 576
    assert text and done.reason in ("stop", "length")


def test_a_full_cache_makes_requests_wait_not_fail(starter_path):
    # 4 slots in 512 cells, 4 requests that need about 200 each: some must wait (or give
    # their cells back and read again), and every answer is what it is alone.
    engine = engine_of(starter_path, n_ctx=512, parallel=4)
    try:
        long = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
        requests = [
            chat(f"{long} Question {i}: what did the fox do?", temperature=0, max_tokens=60)
            for i in range(4)
        ]
        alone = [run(engine, r)[0] for r in requests]
        got = together(engine, requests)
        assert [text for text, _ in got] == alone
        wait_until(lambda: engine._batcher.busy_slots() == 0)
    finally:
        engine.close()
