"""Failure drills on the simulated homelab: what a homelab does to Corral, done for real.

Two extra boxes join the session's cluster for this module (``drill-a`` and
``drill-b``, each a NAS from the fixtures) and run fake-engine models (the
starter GGUF as source, so the memory accounting is real). Then, in order:

1. ``drill-a`` is unplugged (its Ray node killed, no goodbye) while a stream
   runs on it and another on ``drill-b``: the first ends with one error event
   within 10 s, the second completes; every new request succeeds; the
   controller puts what ``drill-a`` ran on ``drill-b`` where it fits, and says
   why not where it does not.
2. ``drill-a`` comes back under the same name: what waited for it runs there again.
3. A replica's process is killed (SIGKILL): its stream ends with an error
   event, Serve starts a new process, the next requests succeed.
4. The controller's process is killed: Ray restarts it; it reads its saved
   state back and adopts every placement (the same replica processes serve),
   with the models file still applied.
5. Corral is stopped and started again, as ``systemctl restart corral`` does,
   and one placement is deleted meanwhile: the new controller adopts the
   others (no model loads again), applies the saved models file again (the
   deleted one loads back), and the API keys and models on disk still hold.

The figures (how long each stream took to end, how long new requests took)
are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import ray
from ray import serve

from cluster.serve_apps import app_name_for
from cluster.server import start_corral
from cluster.state import STATE_FILE, load_state
from deployments.keys import KeyFile, keys_path
from tests.conftest import simulated_node
from tests.support.cluster import (
    apply_models,
    controller,
    events,
    fake_model,
    models_file,
    placement_rows,
    placements,
    replica_info,
    replica_pids,
    wait_for,
)
from tests.support.streams import start_stream

A, B = "drill-a", "drill-b"
SPREAD = "drill-spread:latest"  # one replica on each drill box
ONLY_A = "drill-only-a:latest"  # may run on drill-a only
SOLO = "drill-solo:latest"  # one replica on drill-b, for the replica drill
OURS = {SPREAD, ONLY_A, SOLO}
BOUND = 10.0  # seconds: a broken stream ends, and a new request succeeds, within this
MODELS = models_file(
    fake_model(
        "drill-spread",
        replicas="{min: 2, max: 2}",
        placement=f"{{nodes: [{A}, {B}], strategy: spread}}",
        engine_options="{token_delay: 0.05, reply_tokens: 120}",  # 6 s a stream
    ),
    fake_model(
        "drill-only-a",
        placement=f"{{nodes: [{A}]}}",
        engine_options="{token_delay: 0.01, reply_tokens: 4}",
    ),
    fake_model(
        "drill-solo",
        placement=f"{{nodes: [{B}]}}",
        engine_options="{token_delay: 0.05, reply_tokens: 200}",
    ),
)


def add_box(homelab, name: str):
    return homelab.cluster.add_node(**simulated_node("nas-ram8g", "worker", name))


def up(corral) -> set[str]:
    nodes = httpx.get(f"{corral.url}/api/cluster/nodes", timeout=30).json()["nodes"]
    return {n["name"] for n in nodes if n["state"] == "up"}


@pytest.fixture(scope="module")
def boxes(corral, homelab, tmp_path_factory, starter_path) -> Iterator[dict]:
    """The two drill boxes (by name; a test may replace one that it unplugged) with the
    drill models applied; both gone, and the models with them, when the module ends."""
    nodes = {name: add_box(homelab, name) for name in (A, B)}
    root = tmp_path_factory.mktemp("drills")
    try:
        wait_for(lambda: {A, B} <= up(corral), 60, "the drill boxes to join")
        apply_models(MODELS, root / "models.yaml", starter_path)
        yield nodes
    finally:
        apply_models("models: []\n", root / "empty.yaml", starter_path)
        for node in nodes.values():
            if node.remaining_processes_alive():
                homelab.cluster.remove_node(node, allow_graceful=False)
        # The next module plans on the homelab alone: wait until the boxes show down.
        wait_for(lambda: not {A, B} & up(corral), 30, "the drill boxes to show down")


@pytest.fixture(scope="module")
def http(corral) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=corral.url, timeout=60) as client:
        yield client


def chat(http: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return http.post("/v1/chat/completions", json=body)


def timed_requests(http: httpx.Client, model: str, seconds: float) -> list[tuple[int, float]]:
    """Requests one after another for ``seconds``: (status, seconds each took)."""
    results = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        status = chat(http, model).status_code
        results.append((status, time.monotonic() - started))
    return results


def in_flight(corral, model: str) -> dict[str, int]:
    return {node: row["in_flight"] for node, row in placements(corral, model).items()}


# -- 1. a node unplugged mid-stream ---------------------------------------------------------


def test_a_node_unplugged_mid_stream(corral, homelab, boxes, http):
    assert set(placements(corral, SPREAD)) == {A, B}
    # Two streams: least-loaded routing puts one on each box.
    streams = [start_stream(corral.url, SPREAD) for _ in range(2)]
    wait_for(lambda: all(s.content >= 2 for s in streams), 30, "both streams to flow")
    wait_for(lambda: in_flight(corral, SPREAD) == {A: 1, B: 1}, 10, "a stream on each box")

    since, unplugged = time.time(), time.monotonic()
    homelab.cluster.remove_node(boxes[A], allow_graceful=False)
    after = timed_requests(http, SPREAD, BOUND + 2)
    wait_for(lambda: all(s.ended_at for s in streams), 60, "both streams to end")

    broken = [s for s in streams if s.error]
    whole = [s for s in streams if not s.error]
    assert len(broken) == 1 and len(whole) == 1, [s.events[-2:] for s in streams]
    ended_in = broken[0].ended_at - unplugged
    print(f"\nthe stream on {A} ended {ended_in:.1f} s after it was unplugged")
    assert ended_in < BOUND
    assert broken[0].status == 200 and broken[0].failure is None
    assert broken[0].error["code"] == "service_unavailable", broken[0].error
    assert whole[0].events[-1] == "[DONE]" and whole[0].failure is None

    # Every request sent after the unplug succeeded, none waiting as long as the bound.
    slowest = max(took for _, took in after)
    print(f"{len(after)} requests after the unplug, all 200: the slowest took {slowest:.1f} s")
    assert [status for status, _ in after] == [200] * len(after)
    assert slowest < BOUND

    # The controller puts the lost replica of the spread model on drill-b, and says that
    # the model that may only run on drill-a waits for it.
    wait_for(lambda: events(since, SPREAD, "replace"), 30, "the spread model's replacement")
    assert {node: p["replicas"] for node, p in placements(corral, SPREAD).items()} == {B: 2}
    [lost] = events(since, ONLY_A, "lost")
    assert lost["node"] == A and "left the cluster" in lost["reason"]
    [waiting] = wait_for(lambda: events(since, ONLY_A, "not_replaced"), 10, "not_replaced")
    assert f"{A} is down" in waiting["reason"], waiting
    assert placements(corral, ONLY_A) == {}
    assert chat(http, ONLY_A).status_code in (503, 500)  # it fits nowhere now


def test_the_node_rejoining_is_used_again(corral, homelab, boxes, http):
    since = time.time()
    boxes[A] = add_box(homelab, A)
    [back] = wait_for(lambda: events(since, ONLY_A, "replace"), 60, "drill-only-a to come back")
    assert back["node"] == A
    assert set(placements(corral, ONLY_A)) == {A}
    assert chat(http, ONLY_A).status_code == 200


# -- 2. a replica process killed ------------------------------------------------------------


def test_a_killed_replica_fails_its_stream_cleanly_and_serve_restarts_it(corral, boxes, http):
    before = replica_info(SOLO, B)
    stream = start_stream(corral.url, SOLO)
    wait_for(lambda: stream.content >= 2, 30, "the stream to flow")
    since, killed = time.time(), time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    wait_for(lambda: stream.ended_at, 30, "the stream to end")
    print(f"\nthe stream ended {stream.ended_at - killed:.1f} s after its replica was killed")
    assert stream.ended_at - killed < BOUND
    assert stream.error and stream.error["code"] == "service_unavailable", stream.events[-2:]

    reply = wait_for(lambda: chat(http, SOLO).status_code == 200, 120, "the model again")
    assert reply
    after = replica_info(SOLO, B)
    assert after.pid != before.pid  # a new process: Serve restarted the replica ...
    assert events(since, SOLO, "load") == []  # ... not the controller with a new placement


# -- 3. the controller crashes, and Corral restarts -------------------------------------------


def replica_processes() -> dict[tuple[str, str], frozenset[int]]:
    placed = [(SPREAD, B), (ONLY_A, A), (SOLO, B)]
    found = {(model, node): replica_pids(model, node) for model, node in placed}
    assert [len(pids) for pids in found.values()] == [2, 1, 1], found
    return found


def controller_pid() -> int:
    return ray.get(controller().__ray_call__.remote(lambda _: os.getpid()), timeout=60)


def rows(corral) -> set[tuple[str, str, int]]:
    return {
        (row["model"], row["node"], row["replicas"])
        for row in placement_rows(corral.url)
        if row["model"] in OURS and row["declared"]
    }


def test_a_crashed_controller_comes_back_and_adopts_what_runs(corral, boxes, http):
    saved = load_state(corral.settings.state_path / STATE_FILE)
    assert saved is not None and {s.name for s in saved.declared} == OURS
    pids, before, old = replica_processes(), rows(corral), controller_pid()
    psutil.Process(old).kill()
    new = wait_for(lambda: _answers(controller_pid), 60, "the controller to come back")
    assert new != old
    assert rows(corral) == before  # every placement adopted ...
    assert replica_processes() == pids  # ... by its running replicas: nothing reloaded
    assert chat(http, SPREAD).status_code == 200
    assert chat(http, ONLY_A).status_code == 200


def test_a_restarted_corral_adopts_what_runs_and_keeps_the_keys(corral, boxes, http):
    pids, before = replica_processes(), rows(corral)
    models = tags(http)
    keys = KeyFile(keys_path(corral.settings.state_path))
    _, key = keys.create("drill")
    try:
        corral.stop()
        with pytest.raises(httpx.TransportError):
            http.get("/")
        # While Corral is down, one placement goes (deleted by hand): the restarted
        # controller applies the saved models file again and loads it back.
        serve.delete(app_name_for(ONLY_A, A))
        started = time.monotonic()
        start_corral(corral.settings)  # the same settings, state directory and address
        corral.stopped = False  # the session's fixture stops the new one at the end
        print(f"\nCorral answered again {time.monotonic() - started:.1f} s after its start")
        assert chat(http, SPREAD).status_code == 401  # the key file still rules
        body = {"model": SPREAD, "messages": [{"role": "user", "content": "hi"}]}
        ok = http.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200, ok.text
    finally:
        keys_path(corral.settings.state_path).unlink(missing_ok=True)
    assert tags(http) == models
    wait_for(lambda: rows(corral) == before, 60, "the saved models file applied again")
    after = replica_processes()
    assert after[ONLY_A, A] != pids[ONLY_A, A]  # loaded again: it was gone ...
    del after[ONLY_A, A], pids[ONLY_A, A]
    assert after == pids  # ... and every other placement adopted, not loaded again
    assert chat(http, ONLY_A).status_code == 200


def tags(http: httpx.Client) -> list[str]:
    r = http.get("/api/tags")
    assert r.status_code == 200, r.text
    return sorted(m["name"] for m in r.json()["models"])


def _answers(call):
    try:
        return call()
    except Exception:  # noqa: BLE001 - not back yet
        return None
