"""The official ``ollama`` Python client against a running Corral (real Ray, real model).

What Open WebUI and Ollama's own clients do: chat and generate (whole and
streamed), embeddings, the model list, show, ps, pulling from a registry with
progress, create from an uploaded GGUF, copy and delete, with options and
``format`` honoured, and Ollama's errors for a client's mistakes.
"""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.support.oci import ollama_model, push_model, running_registry
from tests.support.vectors import dot

MODEL = "smollm2:135m"
MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def client(corral) -> ollama.Client:
    return ollama.Client(host=corral.url, timeout=120)


@pytest.fixture(scope="module")
def oci_registry(tmp_path_factory, starter_path):
    """Debian's docker-registry holding the starter model in Ollama's manifest format."""
    with running_registry(tmp_path_factory.mktemp("registry")) as registry:
        push_model(registry.url, "library/smollm2-pulled", "q4", ollama_model(starter_path))
        yield registry


def test_chat(client):
    r = client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
    assert r.model == MODEL and r.done and r.done_reason in ("stop", "length")
    assert r.message.role == "assistant" and "Paris" in r.message.content
    assert r.prompt_eval_count > 20 and 0 < r.eval_count <= 24
    assert r.eval_duration > 0 and r.prompt_eval_duration > 0  # nanoseconds
    assert r.total_duration >= r.eval_duration + r.prompt_eval_duration
    assert r.total_duration < 120 * 10**9


def test_streaming_chat_gives_the_same_answer_piece_by_piece(client):
    whole = client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=MESSAGES, options=GREEDY, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_whole_and_streamed(client):
    r = client.generate(model=MODEL, prompt="Name a color.", options=GREEDY)
    assert r.done and r.response and r.eval_count > 0 and r.load_duration >= 0
    parts = list(client.generate(model=MODEL, prompt="Name a color.", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response
    assert parts[-1].done and parts[-1].done_reason == r.done_reason


def test_options_are_honoured(client):
    # (a story: the first five tokens cannot be the whole answer, whatever else the
    # replica decodes beside it and so however its numbers round)
    short = client.generate(
        model=MODEL, prompt="Write a long story about a dragon.", options={"num_predict": 5}
    )
    assert short.eval_count == 5 and short.done_reason == "length"
    seeded = [
        client.generate(
            model=MODEL,
            prompt="Tell me a story.",
            options={"temperature": 1.5, "seed": 7, "num_predict": 12},
        ).response
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    stopped = client.generate(
        model=MODEL, prompt="Count: one, two, three, four,", options={**GREEDY, "stop": [","]}
    )
    assert "," not in stopped.response


def test_format_json_gives_json(client):
    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        format="json",
        options={"temperature": 0, "num_predict": 64},
    )
    if r.done_reason == "stop":
        json.loads(r.message.content)
    else:  # cut short by num_predict: still JSON so far
        assert r.message.content.lstrip().startswith(("{", "["))
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    r = client.chat(model=MODEL, messages=MESSAGES, format=schema, options={"temperature": 0})
    assert isinstance(json.loads(r.message.content)["city"], str)


def test_embed_and_legacy_embeddings(client):
    r = client.embed(model=MODEL, input=["the cat sat", "the cat sat", "stock markets"])
    a, b, c = r.embeddings
    assert len(a) == 576 and abs(dot(a, a) - 1) < 1e-3
    assert dot(a, b) > 0.999 and dot(a, c) < dot(a, b)
    assert r.prompt_eval_count > 0
    legacy = client.embeddings(model=MODEL, prompt="the cat sat")
    assert dot(legacy.embedding, a) > 0.999


def test_list_show_and_version(client, corral):
    names = {m.model for m in client.list().models}
    assert MODEL in names
    starter = next(m for m in client.list().models if m.model == MODEL)
    assert starter.size > 90 * 10**6 and starter.details.family == "llama"
    assert starter.details.quantization_level == "Q4_1"
    info = client.show(MODEL)
    assert info.details.parameter_size == "135M"
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 8192
    assert "completion" in info.capabilities
    assert httpx.get(f"{corral.url}/api/version").json()["version"]


def test_ps_shows_the_loaded_model_and_keep_alive_0_unloads_it(client):
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive="10m")
    loaded = {m.model: m for m in client.ps().models}
    assert MODEL in loaded
    assert loaded[MODEL].size > 0 and loaded[MODEL].expires_at is not None
    # An empty prompt with keep_alive 0 is how Ollama clients unload a model.
    r = client.generate(model=MODEL, keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert MODEL not in {m.model for m in client.ps().models}
    # ... and an empty prompt alone loads it.
    r = client.generate(model=MODEL)
    assert r.done and r.done_reason == "load"
    assert MODEL in {m.model for m in client.ps().models}


def test_create_from_an_uploaded_gguf_copy_and_delete(client, starter_path):
    digest = client.create_blob(starter_path)
    statuses = [
        p.status
        for p in client.create(
            model="mine:v1", files={"m.gguf": digest}, system="You are terse.", stream=True
        )
    ]
    assert statuses[-1] == "success"
    info = client.show("mine:v1")
    assert "SYSTEM You are terse." in info.modelfile
    r = client.chat(model="mine:v1", messages=MESSAGES[1:], options=GREEDY)
    assert r.message.content
    assert client.copy("mine:v1", "mine:copy").status == "success"
    names = {m.model for m in client.list().models}
    assert {"mine:v1", "mine:copy"} <= names
    assert client.delete("mine:v1").status == "success"
    assert client.delete("mine:copy").status == "success"
    names = {m.model for m in client.list().models}
    assert not names & {"mine:v1", "mine:copy"}


def test_pull_from_a_registry_with_progress(client, oci_registry):
    name = f"{oci_registry.host}/library/smollm2-pulled:q4"
    events = list(client.pull(name, insecure=True, stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    layer = [e for e in events if e.digest and e.total and e.total > 90 * 10**6]
    assert layer and layer[-1].completed == layer[-1].total
    completed = [e.completed or 0 for e in layer]
    assert completed == sorted(completed)
    names = {m.model for m in client.list().models}
    assert name in names
    r = client.generate(model=name, prompt="Hi", options={"num_predict": 3}, keep_alive=0)
    assert r.eval_count == 3
    client.delete(name)
    with pytest.raises(ollama.ResponseError) as err:
        client.pull(f"{oci_registry.host}/library/ghost:1b", insecure=True)
    assert err.value.status_code == 404 and "not found" in err.value.error


def test_client_mistakes(client, corral):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="ghost:7b", messages=MESSAGES)
    assert err.value.status_code == 404 and err.value.error == "model 'ghost:7b' not found"
    with pytest.raises(ollama.ResponseError) as err:
        client.show("ghost:7b")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("ghost:7b")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("../../etc/passwd", "x")
    assert err.value.status_code == 400
    # The client checks `format` itself; a hand-written request gets Ollama's error shape.
    bad = httpx.post(
        f"{corral.url}/api/chat", json={"model": MODEL, "messages": MESSAGES, "format": "yaml"}
    )
    assert bad.status_code == 400 and "format" in bad.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(MODEL)  # built in: nothing to delete, and it keeps serving
    assert err.value.status_code == 400 and "ships with Corral" in err.value.error
    assert client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}).done
