"""Routing, autoscaling, keep-alive, eviction and backpressure on the simulated homelab.

Every test drives the session's Corral over HTTP (the official ``openai``
client and ``httpx``) and reads what happened from the places a user or the
CLI would: ``/api/cluster/placements``, the controller's ``events()`` (load,
evict, expire, scale_up, scale_down) and the replicas' own ``stats()``.

Most models here run the fake engine (deterministic words at a set pace, see
``nodes/fake_engine.py``) with the starter GGUF as ``source``, so the planner's
memory estimates are real while no CPU goes to inference; one test runs the
real llama.cpp engine end to end.

Each test applies its own models file (which removes the previous test's
models); the module applies an empty file when it ends so the other modules
find the cluster as they expect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import openai
import pytest
from ray import serve

from cluster.serve_apps import app_name_for
from nodes.gguf import estimate_memory, read_gguf
from tests.support.cluster import (
    apply_models,
    events,
    fake_model,
    models_file,
    placement_rows,
    placements,
    replica_stats,
    wait_for,
)

T = TypeVar("T")
OURS = {
    f"{name}:latest"
    for name in ("route-fake", "scale-fake", "ka-fake", "ev-pin", "ev-a", "ev-b", "ev-c")
    + ("ev-huge", "burst-fake", "full-fake", "e2e-smol")
}
HI = [{"role": "user", "content": "hi"}]


# -- helpers -------------------------------------------------------------------------


def chat(client: openai.OpenAI, model: str, max_tokens: int = 8, **extra: Any) -> str:
    reply = client.chat.completions.create(model=model, messages=HI, max_tokens=max_tokens, **extra)
    text = reply.choices[0].message.content
    assert text, f"{model} answered nothing"
    return text


@pytest.fixture(scope="module")
def client(corral) -> openai.OpenAI:
    """An OpenAI client that never retries (a 429 or 503 must reach the test)."""
    return openai.OpenAI(base_url=f"{corral.url}/v1", api_key="-", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def apply(corral, tmp_path_factory, starter_path) -> Iterator[Callable[[str], None]]:
    """Apply a models file (``{starter}`` stands for the starter GGUF's path) as
    ``corral apply`` does; the module ends by applying an empty file."""
    root = tmp_path_factory.mktemp("scaling-models")
    count = iter(range(1000))

    def _apply(text: str) -> None:
        apply_models(text, root / f"models-{next(count)}.yaml", starter_path)

    yield _apply
    _apply("models: []\n")
    ours = [
        (row["model"], row["node"]) for row in placement_rows(corral.url) if row["model"] in OURS
    ]
    assert ours == [], f"left running after the module: {ours}"


# -- 1. least-loaded routing ---------------------------------------------------------

ROUTE = "route-fake:latest"
SLOW_NODE = "nas"


def test_concurrent_requests_spread_by_load_and_a_slow_node_gets_fewer(corral, client, apply):
    # One replica on each of the three nodes; the nas makes a token 25 times slower.
    apply(
        models_file(
            fake_model(
                "route-fake",
                replicas="{min: 3, max: 3}",
                engine_options=(
                    "{token_delay: 0.01, reply_tokens: 8, token_delay_by_node: {nas: 0.25}}"
                ),
            )
        )
    )
    rows = placements(corral, ROUTE)
    assert set(rows) == {"minipc", "gpubox", "nas"}, rows
    before = {node: replica_stats(ROUTE, node).finished for node in rows}

    total, workers = 40, 8
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        replies = list(pool.map(lambda _: chat(client, ROUTE), range(total), timeout=120))
    assert len(replies) == total

    served = {node: replica_stats(ROUTE, node).finished - before[node] for node in rows}
    assert sum(served.values()) == total, served
    fast = [n for n in served if n != SLOW_NODE]
    # Every placement takes part, the fast ones about evenly ...
    assert all(served[n] >= total // 4 for n in fast), served
    assert served[SLOW_NODE] >= 1, served
    # ... and the slow node, holding its requests 25 times longer, gets far fewer.
    assert served[SLOW_NODE] * 3 <= min(served[n] for n in fast), served
    assert served[SLOW_NODE] <= total // 5, served


# -- 2. autoscaling ------------------------------------------------------------------

SCALE = "scale-fake:latest"


def test_sustained_load_adds_a_placement_that_goes_once_idle(corral, client, apply):
    apply(
        models_file(
            fake_model(
                "scale-fake",
                replicas="{min: 1, max: 2}",
                autoscaling="{target: 1, upscale_delay: 1s, downscale_delay: 1s}",
                engine_options="{token_delay: 0.05, reply_tokens: 20}",  # 1 s a request
            )
        )
    )
    [first] = placements(corral, SCALE)
    since = time.time()

    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_busy() -> int:
        done = 0
        while not stop.is_set():
            try:
                chat(client, SCALE, max_tokens=20)
                done += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return done
        return done

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(keep_busy) for _ in range(3)]  # 3 in flight, target 1
        try:
            [up] = wait_for(
                lambda: _no(errors) and events(since, SCALE, "scale_up"),
                45,
                "a scale_up event under load",
            )
            assert up["node"] != first, f"the second replica went to {first} too: {up}"
            assert "in flight" in up["reason"], up
            rows = wait_for(
                lambda: (r := placements(corral, SCALE)) and len(r) == 2 and r,
                15,
                "two placements",
            )
            assert set(rows) == {first, up["node"]}
            # The new placement takes its share of the load that goes on.
            wait_for(
                lambda: replica_stats(SCALE, up["node"]).finished > 0,
                20,
                f"the new placement on {up['node']} serving requests",
            )
        finally:
            stop.set()
            done = [f.result(timeout=60) for f in busy]
    assert not errors, errors
    assert sum(done) > 0

    # Idle again: one placement goes (downscale_delay 1s), the last stays (min 1).
    gone = wait_for(
        lambda: events(since, SCALE, "scale_down") or events(since, SCALE, "expire"),
        30,
        "a scale_down once idle",
    )
    assert gone[0]["node"] in (first, up["node"])
    left = wait_for(
        lambda: (r := placements(corral, SCALE)) and len(r) == 1 and r,
        15,
        "one placement left",
    )
    assert set(left) == {first, up["node"]} - {gone[0]["node"]}
    assert len(events(since, SCALE, "scale_up")) == 1
    chat(client, SCALE)  # and the one left serves


def _no(errors: list[BaseException]) -> bool:
    if errors:
        raise errors[0]
    return True


# -- 3. keep_alive 0 -----------------------------------------------------------------

KA = "ka-fake:latest"


def test_keep_alive_zero_in_the_request_unloads_right_after_it(corral, client, apply):
    # The model's own keep_alive is the default (5m); the request asks for 0.
    apply(models_file(fake_model("ka-fake", replicas="{min: 0, max: 1}")))
    assert placements(corral, KA) == {}
    since = time.time()
    chat(client, KA, extra_body={"keep_alive": 0})
    [load] = events(since, KA, "load")
    answered = time.monotonic()
    wait_for(lambda: not placements(corral, KA), 10, f"{KA} out of the placements")
    # The event comes once its replicas are gone (routes drain first, ROUTES_TTL).
    [expired] = wait_for(lambda: events(since, KA, "expire"), 10, f"{KA} expired")
    assert time.monotonic() - answered < 10
    assert expired["node"] == load["node"]
    assert "keep_alive 0s" in expired["reason"], expired
    assert not placements(corral, KA)
    app = app_name_for(KA, load["node"])
    assert app not in serve.status().applications

    # Without keep_alive the model's own 5m applies: it stays loaded.
    chat(client, KA)
    [node] = placements(corral, KA)
    time.sleep(2)  # several policy ticks (0.5 s): nothing may expire it meanwhile
    assert set(placements(corral, KA)) == {node}
    row = placements(corral, KA)[node]
    assert row["expires_at"] is not None and row["expires_at"] > time.time() + 200, row


# -- 4. eviction ---------------------------------------------------------------------

# ~1.7 GiB a replica (KV cache and prompt cache): the nas (5.6 GiB) holds three, not four
EV_CONTEXT = 52000
EV_HUGE = 300_000  # ~8.5 GiB: more than the nas offers even when empty


@pytest.fixture
def nas_fits(corral, starter_path) -> None:
    """Check the premise of the eviction test with the planner's own numbers: besides
    what other modules left on the nas, it holds three of the models, and not four
    even once everything else is gone."""
    r = httpx.get(f"{corral.url}/api/cluster/nodes", timeout=30)
    [nas] = [n for n in r.json()["nodes"] if n["name"] == "nas"]
    others = sum(
        row["replicas"] * row["ram"]
        for row in placement_rows(corral.url)
        if row["node"] == "nas" and row["model"] not in OURS
    )
    info = read_gguf(starter_path)
    one = estimate_memory(info, EV_CONTEXT, gpu_layers=0).ram
    assert 3 * one + others <= nas["ram_offered"] < 4 * one, (one, others, nas["ram_offered"])
    huge = estimate_memory(info, EV_HUGE, gpu_layers=0).ram
    assert huge > nas["ram_offered"]


def test_lru_idle_model_is_evicted_and_a_pinned_one_never(corral, client, apply, nas_fits):
    on_nas = "{nodes: [nas]}"
    common = {"context": str(EV_CONTEXT), "replicas": "{min: 0, max: 1}", "placement": on_nas}
    apply(
        models_file(
            fake_model("ev-pin", pinned="true", **common),
            fake_model("ev-a", **common),
            fake_model("ev-b", **common),
            fake_model("ev-c", **common),
            fake_model("ev-huge", **{**common, "context": str(EV_HUGE)}),
        )
    )
    since = time.time()
    # The pinned model is used first: the least recently used of all.
    for name in ("ev-pin", "ev-a", "ev-b"):
        chat(client, name)
    running = {row["model"] for row in placement_rows(corral.url) if row["node"] == "nas"}
    assert {"ev-pin:latest", "ev-a:latest", "ev-b:latest"} <= running
    assert events(since, kind="evict") == []

    third = time.time()
    chat(client, "ev-c")
    [evicted] = events(third, kind="evict")
    assert (evicted["model"], evicted["node"]) == ("ev-a:latest", "nas"), evicted
    assert "to make room for ev-c:latest" in evicted["reason"]
    assert "least recently used" in evicted["reason"]
    assert [e["model"] for e in events(third, kind="load")] == ["ev-c:latest"]
    on_nas_now = {
        (row["model"], row["status"]) for row in placement_rows(corral.url) if row["node"] == "nas"
    }
    assert ("ev-pin:latest", "RUNNING") in on_nas_now
    assert ("ev-b:latest", "RUNNING") in on_nas_now
    assert ("ev-c:latest", "RUNNING") in on_nas_now
    assert not any(m == "ev-a:latest" for m, _ in on_nas_now)
    chat(client, "ev-pin")  # the pinned one still answers

    # A model bigger than the whole nas: evicting cannot help, so nothing is evicted.
    refused = time.time()
    r = httpx.post(
        f"{corral.url}/v1/chat/completions",
        json={"model": "ev-huge", "messages": HI, "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "service_unavailable"
    assert "ev-huge:latest" in error["message"] and "cannot be loaded now" in error["message"]
    assert "needs" in error["message"] and "nas" in error["message"], error["message"]
    assert events(refused, kind="evict") == []
    assert events(refused, kind="load") == []
    still = {row["model"] for row in placement_rows(corral.url) if row["node"] == "nas"}
    assert {"ev-pin:latest", "ev-b:latest", "ev-c:latest"} <= still


# -- 5. a burst on a cold model ------------------------------------------------------

BURST = "burst-fake:latest"


def test_a_burst_on_a_cold_model_loads_it_once_and_all_succeed(corral, client, apply):
    apply(
        models_file(
            fake_model(
                "burst-fake",
                replicas="{min: 0, max: 1}",
                engine_options="{load_delay: 1.0, token_delay: 0.01}",
            )
        )
    )
    assert placements(corral, BURST) == {}
    since = time.time()
    barrier = threading.Barrier(8)

    def one(_: int) -> str:
        barrier.wait(timeout=30)
        return chat(client, BURST)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8), timeout=120))
    assert len(replies) == 8 and all(replies)
    loads = events(since, BURST, "load")
    assert len(loads) == 1, loads
    rows = placements(corral, BURST)
    assert set(rows) == {loads[0]["node"]} and rows[loads[0]["node"]]["replicas"] == 1
    assert replica_stats(BURST, loads[0]["node"]).finished == 8


# -- 6. backpressure -----------------------------------------------------------------

FULL = "full-fake:latest"


def test_every_replica_full_answers_429_with_retry_after(corral, apply):
    """One replica holds ``max_queue`` requests (64 in the session's Corral): 64 streams
    that wait long before their first token fill it; the 65th request is refused at
    once. Closing the streams cancels their work."""
    capacity = corral.settings.max_queue
    assert capacity <= 64, "too many streams to hold open on this box"
    apply(
        models_file(
            fake_model(
                "full-fake",
                replicas="{min: 1, max: 1}",
                engine_options="{prompt_delay: 60, token_delay: 0.01}",
            )
        )
    )
    [node] = placements(corral, FULL)
    body = {"model": FULL, "messages": HI, "max_tokens": 4}

    async def scenario() -> httpx.Response:
        limits = httpx.Limits(max_connections=capacity + 8)
        timeout = httpx.Timeout(60)
        async with (
            httpx.AsyncClient(base_url=corral.url, limits=limits, timeout=timeout) as http,
            contextlib.AsyncExitStack() as held,
        ):

            async def hold() -> int:
                ctx = http.stream("POST", "/v1/chat/completions", json={**body, "stream": True})
                r = await held.enter_async_context(ctx)
                return r.status_code  # headers: the replica admitted it

            statuses = await asyncio.wait_for(
                asyncio.gather(*(hold() for _ in range(capacity))), 90
            )
            assert statuses == [200] * capacity
            return await http.post("/v1/chat/completions", json=body)

    r = asyncio.run(scenario())
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    assert f"{capacity} requests" in error["message"]
    # The streams are closed: the replica drops their work and is free again.
    drained = wait_for(
        lambda: (s := replica_stats(FULL, node)).pending == 0 and s.cancelled == capacity and s,
        30,
        "the held requests to be cancelled",
    )
    assert (drained.finished, drained.failed) == (0, 0)
    # ... and admits a request again (its first token would come after prompt_delay).
    with httpx.stream(
        "POST", f"{corral.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as again:
        assert again.status_code == 200


# -- 7. llama.cpp end to end ---------------------------------------------------------

E2E = "e2e-smol:latest"


def test_llamacpp_cold_start_answers_then_keep_alive_zero_unloads(corral, client, apply):
    apply(
        models_file(
            "  - name: e2e-smol\n"
            "    source: {starter}\n"
            "    engine: llama.cpp\n"
            "    context: 512\n"
            "    threads: 1\n"
            "    keep_alive: 0\n"
            "    replicas: {min: 0, max: 1}\n"
        )
    )
    assert placements(corral, E2E) == {}
    since = time.time()
    reply = client.chat.completions.create(
        model="e2e-smol",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    [load] = events(since, E2E, "load")
    wait_for(lambda: not placements(corral, E2E), 15, f"{E2E} out of the placements")
    [expired] = wait_for(lambda: events(since, E2E, "expire"), 15, f"{E2E} expired")
    assert not placements(corral, E2E)
    assert expired["node"] == load["node"] and "keep_alive 0s" in expired["reason"]
    app = app_name_for(E2E, load["node"])
    wait_for(lambda: app not in serve.status().applications, 15, f"{app} deleted from Serve")
