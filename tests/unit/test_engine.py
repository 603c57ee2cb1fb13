"""The engines: LlamaCppEngine on the real starter model, FakeEngine, StopMatcher."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from nodes.engine import (
    ChatMessage,
    Engine,
    EngineSpec,
    Finished,
    GenerateRequest,
    SamplingParams,
    StopMatcher,
    TextDelta,
    load_engine,
    max_new_tokens,
)
from nodes.errors import ContextLengthExceeded, InvalidRequest, ModelLoadFailed
from nodes.fake_engine import EngineFault, FakeEngine
from tests.support.vectors import dot


def run(engine: Engine, request: GenerateRequest, cancel: threading.Event | None = None):
    """Text and the Finished event of one generation."""
    events = list(
        engine.generate(engine.encode(request), request.params, cancel or threading.Event())
    )
    assert isinstance(events[-1], Finished), "every generation ends with exactly one Finished"
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


def chat(text: str, **params) -> GenerateRequest:
    return GenerateRequest(messages=(ChatMessage("user", text),), params=SamplingParams(**params))


@pytest.fixture(scope="module")
def reference(starter_path: Path):
    """llama-cpp-python's own high-level API on the same file: the expected behaviour, with
    the CPU kernels the engine uses on this box and flash attention, which the engine's
    default (auto) turns on for the CPU: both round differently otherwise."""
    from llama_cpp import Llama

    from nodes import cpu_kernels

    with cpu_kernels.extra_bufts(cpu_kernels.current().extra_bufts):
        llm = Llama(str(starter_path), n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llama(starter_path: Path):
    engine = load_engine(
        EngineSpec(model="smollm2:135m", path=str(starter_path), n_ctx=512, n_threads=2)
    )
    yield engine
    engine.close()


# -- LlamaCppEngine (real model) ------------------------------------------------------------


def test_loads_with_the_requested_context_and_reports_the_model(llama):
    assert llama.info.n_ctx == 512
    assert llama.info.n_ctx_train == 8192  # SmolLM2's GGUF metadata
    assert llama.info.n_embd == 576
    assert llama.info.load_seconds > 0


def test_chat_uses_the_models_own_template(llama):
    # SmolLM2's template (from the GGUF) is ChatML with a default system prompt.
    tokens = llama.encode(chat("Hello"))
    text = llama.detokenize(tokens, special=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_chat_matches_llama_cpp_pythons_own_chat_completion(llama, reference):
    # llama-cpp-python's create_chat_completion on the same file (same GGUF
    # template, greedy sampling) must give exactly the same answer.
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ref = reference.create_chat_completion(messages=messages, temperature=0, max_tokens=32)
    req = GenerateRequest(
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages),
        params=SamplingParams(temperature=0, max_tokens=32),
    )
    text, done = run(llama, req)
    assert text == ref["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert done.reason == ref["choices"][0]["finish_reason"] == "stop"
    assert done.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert done.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert done.timings.prompt > 0 and done.timings.generation > 0


def test_max_tokens_stops_with_reason_length(llama):
    text, done = run(llama, chat("Write a long story about a dragon.", max_tokens=5, seed=1))
    assert done.reason == "length"
    assert done.usage.completion_tokens == 5
    assert text


def test_same_seed_same_text_and_other_seed_differs(llama):
    def req(seed: int) -> GenerateRequest:
        return chat("Invent a name for a cat.", temperature=1.0, max_tokens=24, seed=seed)

    first, _ = run(llama, req(7))
    again, _ = run(llama, req(7))
    others = {run(llama, req(s))[0] for s in (8, 9, 10)}
    assert first == again
    assert others != {first}


def test_stop_sequence_cuts_the_text_before_it(llama):
    req = chat(
        "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40, stop=("5",)
    )
    text, done = run(llama, req)
    assert done.reason == "stop"
    assert "4" in text and "5" not in text


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.9, "seed": 42},
        {"temperature": 1.2, "top_k": 5, "top_p": 0.8, "seed": 3},
        {"temperature": 0.7, "min_p": 0.2, "repeat_penalty": 1.5, "seed": 11},
        {"temperature": 1.0, "presence_penalty": 1.0, "frequency_penalty": 1.5, "seed": 5},
    ],
    ids=["temperature", "top_k+top_p", "min_p+repeat", "presence+frequency"],
)
def test_sampling_settings_reach_llama_cpp_exactly(llama, reference, params):
    # Same seed and settings as llama-cpp-python's own create_completion: same text.
    prompt = "Once upon a time, in a small village,"
    ref = reference.create_completion(prompt, max_tokens=24, **params)
    text, done = run(
        llama, GenerateRequest(prompt=prompt, params=SamplingParams(max_tokens=24, **params))
    )
    assert text == ref["choices"][0]["text"]
    assert done.usage.completion_tokens == ref["usage"]["completion_tokens"]


def test_completion_of_a_raw_prompt(llama):
    req = GenerateRequest(
        prompt="The capital of France is", params=SamplingParams(temperature=0, max_tokens=4)
    )
    text, done = run(llama, req)
    assert "Paris" in text
    assert done.usage.completion_tokens <= 4


def test_json_mode_and_json_schema_constrain_the_output(llama):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    text, _ = run(
        llama,
        chat(
            "The biggest city of France as JSON.", temperature=0, max_tokens=60, json_schema=schema
        ),
    )
    data = json.loads(text)
    assert set(data) == {"city", "population"} and isinstance(data["population"], int)
    text, done = run(
        llama, chat("Describe Paris as JSON.", temperature=0, max_tokens=200, json_mode=True)
    )
    if done.reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")


def test_a_bad_json_schema_is_refused_before_generation(llama):
    with pytest.raises(InvalidRequest, match="schema"):
        llama.encode(chat("x", json_schema={"type": "no-such-type"}))


def test_prompt_longer_than_the_context_is_refused(llama):
    with pytest.raises(ContextLengthExceeded) as err:
        llama.encode(chat("word " * 600))
    assert err.value.n_ctx == 512 and err.value.n_prompt > 512
    assert "512" in err.value.message and err.value.param == "messages"


def test_generation_never_overruns_the_context(llama):
    prompt = "Tell me everything about the history of Rome. " * 20
    req = GenerateRequest(
        prompt=prompt, params=SamplingParams(max_tokens=10_000, temperature=0, seed=1)
    )
    tokens = llama.encode(req)
    text, done = run(llama, req)
    assert done.usage.prompt_tokens + done.usage.completion_tokens <= 512
    assert done.usage.completion_tokens <= 512 - len(tokens)


def test_cancel_stops_generation_at_the_next_token(llama):
    cancel = threading.Event()
    req = chat("Count from 1 to 1000.", temperature=0, max_tokens=400)
    events = llama.generate(llama.encode(req), req.params, cancel)
    got = [next(events), next(events)]
    cancel.set()
    rest = list(events)
    assert isinstance(got[0], TextDelta)
    assert len(rest) == 1 and isinstance(rest[0], Finished) and rest[0].reason == "cancelled"
    assert rest[0].usage.completion_tokens <= 3
    # The context is usable right away for the next request.
    text, done = run(llama, chat("What is 2+2?", temperature=0, max_tokens=8))
    assert done.reason in ("stop", "length") and text


def test_embeddings_are_normalised_vectors_of_the_model_width(llama):
    emb = llama.embed(
        ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock prices fell."]
    )
    assert len(emb.vectors) == 3 and all(len(v) == 576 for v in emb.vectors)
    for v in emb.vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-3)
    assert dot(emb.vectors[0], emb.vectors[1]) > dot(emb.vectors[0], emb.vectors[2])
    assert emb.prompt_tokens > 10
    # Embedding uses its own context: chat still works, with its prompt cache intact.
    req = GenerateRequest(
        prompt="The capital of France is", params=SamplingParams(temperature=0, max_tokens=4)
    )
    text, _ = run(llama, req)
    assert "Paris" in text


def test_embedding_input_longer_than_the_context_is_refused(llama):
    with pytest.raises(ContextLengthExceeded) as err:
        llama.embed(["short", "word " * 600])
    assert err.value.param == "input.1"


def test_a_file_that_is_not_gguf_is_refused_with_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelLoadFailed, match="not a GGUF file"):
        load_engine(EngineSpec(model="bad", path=str(bad)))
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        load_engine(EngineSpec(model="bad", path=str(tmp_path / "missing.gguf")))


def test_a_truncated_gguf_is_refused_with_a_clear_error(tmp_path, starter_path):
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(starter_path.read_bytes()[: 4 * 1024 * 1024])
    with pytest.raises(ModelLoadFailed, match="could not load"):
        load_engine(EngineSpec(model="cut", path=str(cut)))


# -- FakeEngine ---------------------------------------------------------------------------


def fake(**options) -> FakeEngine:
    return FakeEngine(EngineSpec(model="fake", path="", n_ctx=64, engine="fake", options=options))


def test_fake_engine_is_deterministic_and_honours_max_tokens_and_stop():
    engine = fake(token_delay=0)
    a, done_a = run(engine, chat("hello there", seed=3))
    b, _ = run(engine, chat("hello there", seed=3))
    c, _ = run(engine, chat("hello there", seed=4))
    assert a == b and a != c
    assert done_a.reason == "stop" and done_a.usage.completion_tokens == 16
    _, short = run(engine, chat("hello there", max_tokens=3))
    assert short.reason == "length" and short.usage.completion_tokens == 3
    word = a.split()[2]
    cut, done = run(engine, chat("hello there", seed=3, stop=(word,)))
    assert done.reason == "stop" and word not in cut and a.startswith(cut)


def test_fake_engine_paces_tokens_and_cancels():
    engine = fake(token_delay=0.02, reply_tokens=10)
    started = time.perf_counter()
    _, done = run(engine, chat("x"))
    assert time.perf_counter() - started >= 10 * 0.02
    assert done.usage.completion_tokens == 10
    cancel = threading.Event()
    cancel.set()
    _, done = run(engine, chat("x"), cancel)
    assert done.reason == "cancelled" and done.usage.completion_tokens == 0


def test_fake_engine_checks_the_context_and_injects_faults():
    with pytest.raises(ContextLengthExceeded):
        fake().encode(chat("w " * 100))
    engine = fake(token_delay=0, fail_after=2)
    req = chat("x")
    events = engine.generate(engine.encode(req), req.params, threading.Event())
    assert [type(next(events)) for _ in range(2)] == [TextDelta, TextDelta]
    with pytest.raises(EngineFault):
        next(events)


def test_fake_embeddings_are_normalised_and_stable():
    engine = fake()
    one, two = engine.embed(["a b", "a b"]).vectors
    assert one == two and math.isclose(sum(x * x for x in one), 1.0)


# -- helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello", " world"], ["END"], "Hello world", False),
        (["Hel", "lo EN", "D and more"], ["END"], "Hello ", True),
        (["ab", "c"], ["abc", "b"], "a", True),  # the earliest stop wins
        (["x<", "|", "im_end|>"], ["<|im_end|>"], "x", True),
        (["x<", "y"], ["<|"], "x<y", False),  # a false start is released
        (["tail <"], ["<stop>"], "tail <", False),  # released by flush
    ],
)
def test_stop_matcher_holds_back_possible_stop_prefixes(pieces, stops, emitted, stopped):
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (emitted, stopped)


def test_max_new_tokens_is_capped_by_the_context():
    assert max_new_tokens(100, 512, None) == 412
    assert max_new_tokens(100, 512, 20) == 20
    assert max_new_tokens(100, 512, 10_000) == 412


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"repeat_penalty": 1e39}, "repeat_penalty"),  # beyond llama.cpp's float32
        ({"seed": 2**64}, "seed"),
        ({"num_ctx": 0}, "num_ctx"),
    ],
)
def test_sampling_params_refuse_what_no_sampler_takes(fields, param):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**fields)
    assert err.value.param == param and param in err.value.message


def test_sampling_params_clamp_what_only_means_no_limit():
    params = SamplingParams(max_tokens=2**80, num_ctx=2**80, top_k=2**80, seed=-(2**63))
    assert params.top_k == 2**31 - 1  # llama.cpp's top_k is 32-bit: every candidate
    assert params.context(4096) == 4096 and max_new_tokens(10, 4096, params.max_tokens) == 4086
