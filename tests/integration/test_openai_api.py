"""The OpenAI API end to end: official ``openai`` client -> Serve -> real llama.cpp replica."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.backend import CONTROLLER_ACTOR, NAMESPACE
from deployments.replica import REPLICA_DEPLOYMENT, ReplicaStats

MODEL = "smollm2:135m"
MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def client(corral) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused", max_retries=0, timeout=60)


def replica_stats() -> ReplicaStats:
    apps = ray.get(ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE).running.remote())
    handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, apps[MODEL])
    return handle.stats.remote().result()


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_root_says_corral_is_running(corral):
    r = httpx.get(corral.url + "/")
    assert r.status_code == 200 and r.text == "Corral is running"


def test_ray_runs_with_token_auth(corral):
    address = ray.get_runtime_context().gcs_address
    probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}); print('joined')"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    wrong = subprocess.run(
        probe, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True, text=True, timeout=120,
    )
    assert wrong.returncode != 0 and "joined" not in wrong.stdout
    right = subprocess.run(
        probe, env={**env, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(corral.settings.state_path / "ray-token")},
        capture_output=True, text=True, timeout=120,
    )
    assert right.returncode == 0 and "joined" in right.stdout, right.stderr[-2000:]


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
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32)
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
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_is_reproducible(client):
    ask = lambda: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
        temperature=1.0, seed=1234, max_tokens=16,
    ).choices[0].message.content
    assert ask() == ask()


def test_stop_sequences(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        temperature=0, max_tokens=40, stop=["5"],
    )
    assert "4" in r.choices[0].message.content and "5" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_text_completion(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["The cat sleeps.", "A cat is sleeping.", "Taxes rose."])
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 576 for v in vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert r.usage.prompt_tokens > 0


def test_json_response_format(client):
    import json

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


# -- errors ---------------------------------------------------------------------------------


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


def test_client_disconnect_mid_stream_frees_the_replica(client, corral):
    before = replica_stats()
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
        "temperature": 0,
        "max_tokens": 1900,  # ~30 s of generation if nobody stopped it
        "stream": True,
    }
    with httpx.stream("POST", f"{corral.url}/v1/chat/completions", json=req, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(12)]
    assert any('"content"' in line for line in got)
    after = wait_for(
        lambda: (s := replica_stats()).pending == 0 and s.cancelled > before.cancelled and s,
        what="the replica to cancel the abandoned generation",
    )
    assert after.cancelled == before.cancelled + 1
    # The next request is served at once, not after the abandoned one would have finished.
    quick = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused", max_retries=0, timeout=15)
    r = quick.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=16)
    assert r.choices[0].message.content


def test_client_giving_up_on_a_whole_answer_frees_the_replica(corral):
    before = replica_stats()
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
        "temperature": 0,
        "max_tokens": 1900,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{corral.url}/v1/chat/completions", json=req, timeout=2)
    after = wait_for(
        lambda: (s := replica_stats()).pending == 0 and s.cancelled > before.cancelled and s,
        what="the replica to cancel the generation nobody waits for",
    )
    assert after.finished == before.finished  # it was stopped, not run to the end


def test_requests_are_queued_in_order_not_cancelled(client):
    """Several concurrent streams on one replica all complete: none cancels another."""
    import concurrent.futures

    def one(i: int) -> tuple[str, str]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}],
            temperature=0, max_tokens=12,
        )
        return r.choices[0].finish_reason, r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(reason in ("stop", "length") and text for reason, text in results)


def test_a_replica_dying_mid_stream_ends_the_stream_with_one_error_event(client):
    """Runs last in this module: it kills the replica (Serve restarts it)."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
        temperature=0, max_tokens=1900, stream=True,
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    replicas = [
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if REPLICA_DEPLOYMENT in a["name"] and "model-" in a["name"]
    ]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    with pytest.raises(openai.APIError) as err:
        for _ in chunks:
            pass
    assert "replica" in err.value.message or "error" in err.value.message
    # Serve starts a new replica; the model answers again.
    r = wait_for(
        lambda: _try_chat(client), timeout=90, what="the restarted replica to answer"
    )
    assert r.choices[0].message.content


def _try_chat(client):
    try:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    except openai.APIError:
        return None
