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

from deployments.backend import CONTROLLER_ACTOR, NAMESPACE
from deployments.replica import REPLICA_DEPLOYMENT, ReplicaStats

MODEL = "smollm2:135m"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
LONG_REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
    "temperature": 0,
    "max_tokens": 1900,  # ~30 s of generation if nobody stopped it
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


def test_concurrent_requests_queue_first_come_first_served(client, corral):
    """A replica runs one generation at a time; later requests wait, none is cancelled."""

    def one(i: int) -> tuple[int, float, dict]:
        time.sleep(0.3 * i)  # arrive in order 0, 1, 2, 3
        body = {
            **LONG_REQUEST,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": f"Story {i}."}],
        }
        r = httpx.post(f"{corral.url}/v1/chat/completions", json=body, timeout=120)
        return i, time.monotonic(), r.json()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(body["choices"][0]["finish_reason"] in ("stop", "length") for _, _, body in results)
    assert all(body["choices"][0]["message"]["content"] for _, _, body in results)
    finished_order = [i for i, _, _ in sorted(results, key=lambda r: r[1])]
    assert finished_order == [0, 1, 2, 3]


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
