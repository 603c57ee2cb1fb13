"""Serving mechanics end to end: auth, queueing, cancellation, failures.

Corral started as ``corral serve`` starts it (the session's ``corral``
fixture), driven over HTTP; replica state is read through Serve handles.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
from deployments.replica import REPLICA_DEPLOYMENT, ReplicaStats

MODEL = "smollm2:135m"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
LONG_REQUEST = {
    "model": MODEL,
    # The starter model's greedy answer to this runs to the limit (it stops early on
    # "Count from 1 to 2000"): ~30 s of generation if nobody stopped it.
    "messages": [
        {
            "role": "user",
            "content": "Write the numbers from 1 to 2000, separated by commas, on one line.",
        }
    ],
    "temperature": 0,
    "max_tokens": 1900,
}


@pytest.fixture(scope="module")
def client(openai_client) -> openai.OpenAI:
    # Load the model (if no earlier test did) so its replica can be inspected.
    openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    return openai_client


def replica_stats() -> ReplicaStats:
    routes = ray.get(ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE).ensure.remote(MODEL))
    assert len(routes) == 1, f"expected one placement of {MODEL}, found {routes}"
    handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, routes[0].app)
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
        probe,
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "joined" not in wrong.stdout
    right = subprocess.run(
        probe,
        env={
            **env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(corral.settings.state_path / "ray-token"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert right.returncode == 0 and "joined" in right.stdout, right.stderr[-2000:]


def test_client_disconnect_mid_stream_frees_the_replica(client, corral):
    before = replica_stats()
    req = {**LONG_REQUEST, "stream": True}
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


def test_client_giving_up_on_a_whole_answer_frees_the_replica(client, corral):
    before = replica_stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{corral.url}/v1/chat/completions", json=LONG_REQUEST, timeout=2)
    after = wait_for(
        lambda: (s := replica_stats()).pending == 0 and s.cancelled > before.cancelled and s,
        what="the replica to cancel the generation nobody waits for",
    )
    assert after.finished == before.finished  # it was stopped, not run to the end


def test_a_replica_decodes_its_slots_together_and_queues_the_rest(client, corral):
    """The real engine runs as many requests at once as its replica has slots, decoding
    them together; one more waits for a slot and starts when one frees."""
    [running] = [
        m for m in httpx.get(f"{corral.url}/api/ps").json()["models"] if m["name"] == MODEL
    ]
    [placement] = running["placements"]
    slots = placement["slots"]
    assert slots >= 2, placement
    first_token: dict[int, float] = {}
    ended: dict[int, float] = {}

    def one(i: int) -> dict:
        time.sleep(0.2 * i)  # arrive in order
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Write a long story about dragon {i}."}],
            "temperature": 0,
            "max_tokens": 60,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks = []
        with httpx.stream("POST", f"{corral.url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first_token.setdefault(i, time.monotonic())
        ended[i] = time.monotonic()
        return chunks[-1]

    with concurrent.futures.ThreadPoolExecutor(slots + 1) as pool:
        lasts = list(pool.map(one, range(slots + 1)))
    assert all(last["usage"]["completion_tokens"] == 60 for last in lasts), lasts
    together, extra = range(slots), slots
    # every slot's request had its first token before any of them was done ...
    assert max(first_token[i] for i in together) < min(ended[i] for i in together)
    # ... and the one beyond the slots began only once a slot was free
    assert first_token[extra] > min(ended[i] for i in together)
    assert replica_stats().pending == 0


def test_a_replica_dying_mid_stream_ends_the_stream_with_one_error_event(corral, client):
    """Runs last in this module: it kills the replica (Serve starts a new one)."""
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if REPLICA_DEPLOYMENT in a["name"] and "model-" in a["name"]
    ]
    assert len(replicas) == 1
    replica = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    req = {**LONG_REQUEST, "stream": True}
    events = []
    with httpx.stream("POST", f"{corral.url}/v1/chat/completions", json=req, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    ray.kill(replica)
    errors = [e for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and events[-1] == errors[0], events[-3:]
    error = json.loads(errors[0])["error"]
    assert error["code"] == "service_unavailable" and "Retry" in error["message"]
    # Serve starts a new replica; the model answers again.
    r = wait_for(lambda: _try_chat(client), timeout=90, what="the restarted replica to answer")
    assert r.choices[0].message.content


def _try_chat(client):
    try:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    except openai.APIError:
        return None
