"""The official ``openai`` Python client against a running Corral (real Ray, real model).

Every route of the OpenAI API Corral serves, and each client mistake with the
error the client library raises for it.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.support.vectors import dot

MODEL = "smollm2:135m"
MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def client(openai_client) -> openai.OpenAI:
    return openai_client


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.created > 0
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("ghost:7b")
    assert err.value.code == "model_not_found"


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32)
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens < 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_gives_the_same_answer_token_by_token(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_long_answer_arrives_in_several_chunks(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 40, separated by commas."}],
        temperature=0,
        max_tokens=100,
        stream=True,
    )
    content = [c.choices[0].delta.content for c in stream if c.choices]
    content = [piece for piece in content if piece]
    # ~1 s of generation here, sent as it is produced (a message per 50 ms at most).
    assert len(content) >= 4
    assert "".join(content).startswith("1")


def test_seeded_sampling_is_reproducible(client):
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a fruit."}],
            temperature=1.0,
            seed=seed,
            max_tokens=16,
        )
        return r.choices[0].message.content

    assert ask(1234) == ask(1234)


def test_stop_sequences(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        temperature=0,
        max_tokens=40,
        stop=["5"],
    )
    assert "4" in r.choices[0].message.content and "5" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_text_completion(client):
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_embeddings(client):
    r = client.embeddings.create(
        model=MODEL, input=["The cat sleeps.", "A cat is sleeping.", "Taxes rose."]
    )
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 576 for v in vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert r.usage.prompt_tokens > 0


def test_json_response_format(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        temperature=0,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "capital",
                "schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
    )
    assert set(json.loads(r.choices[0].message.content)) == {"city"}


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_model_not_found(client, stream):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="ghost:7b", messages=MESSAGES, stream=stream)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "ghost:7b" in err.value.message


def test_malformed_body_is_400_naming_the_field(client, corral):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert err.value.status_code == 400 and err.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert err.value.param == "temperature"
    raw = httpx.post(f"{corral.url}/v1/chat/completions", content=b'{"model": "x", "messages": [')
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_400_context_length_exceeded(client, stream):
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long, stream=stream)
    assert err.value.code == "context_length_exceeded"
    assert "2048" in err.value.message
