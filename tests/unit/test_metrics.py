"""/metrics over HTTP: the real app, a real server, scraped and parsed as Prometheus would.

The app (``build_api``) runs under uvicorn over ``LocalBackend`` (in-process
replicas of fake-engine models); each test gets a fresh app, so the counts it
reads are the requests it made. Scrapes are parsed with prometheus_client's own
parser. The real cluster and engine are in ``tests/integration/test_metrics.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from deployments import metrics as metrics_module
from deployments.api import build_api
from deployments.auth import Keyring
from deployments.keys import KeyFile, keys_path
from deployments.metrics import cluster_families
from deployments.views import ClusterMetrics, EventCount
from nodes.engine import EngineSpec
from nodes.errors import ServiceUnavailable
from tests.support.local_backend import NODE, LocalBackend
from tests.support.serve import serve_app

A, B = "fake:a", "fake:b"
SLOW = "fake:slow"  # a long reply at a slow pace: a request that stays in flight
CHAT = "/v1/chat/completions"
MODEL = "/v1/models/{model_id:path}"  # the route template, as the label shows it
HI = [{"role": "user", "content": "hi"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def backend() -> LocalBackend:
    fake = {"token_delay": 0}
    return LocalBackend(
        [
            EngineSpec(model=A, path="", engine="fake", n_ctx=64, options=fake),
            EngineSpec(model=B, path="", engine="fake", options=fake),
            EngineSpec(
                model=SLOW,
                path="",
                engine="fake",
                options={"token_delay": 0.05, "reply_tokens": 2000},
            ),
        ]
    )


@pytest.fixture
def http(backend) -> Iterator[httpx.Client]:
    with serve_app(build_api(backend)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def requests(samples: Samples) -> dict[tuple[str, str, str], float]:
    """corral_requests_total as {(route, model, status): count}."""
    return {
        (d["route"], d["model"], d["status"]): v
        for d, v in ((dict(k), v) for k, v in series(samples, "corral_requests_total").items())
    }


def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (10 s at most) for something the server does after answering."""
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def sse(response: httpx.Response) -> list[dict]:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_requests_are_counted_by_route_template_model_and_status(http):
    for _ in range(2):
        assert http.post(CHAT, json={"model": A, "messages": HI, "max_tokens": 4}).is_success
    assert http.post(CHAT, json={"model": A, "messages": HI, "stream": True}).is_success
    assert http.post("/v1/completions", json={"model": B, "prompt": "hi"}).is_success
    assert http.post("/api/chat", json={"model": B, "messages": HI}).is_success  # streamed
    assert http.post("/api/generate", json={"model": A, "prompt": "hi", "stream": False})
    assert http.get(f"/v1/models/{A}").is_success
    # Client errors name models that may not exist: counted without the name.
    assert http.post(CHAT, json={"model": "no-such:model", "messages": HI}).status_code == 404
    too_long = [{"role": "user", "content": "word " * 100}]  # A's context is 64 tokens
    assert http.post(CHAT, json={"model": A, "messages": too_long}).status_code == 400
    assert http.post("/api/chat", json={"model": A, "messages": "hi"}).status_code == 400
    assert http.get("/no/such/path").status_code == 404
    assert http.get(CHAT).status_code == 405

    assert requests(scrape(http)) == {
        (CHAT, A, "200"): 3,
        ("/v1/completions", B, "200"): 1,
        ("/api/chat", B, "200"): 1,
        ("/api/generate", A, "200"): 1,
        (MODEL, "", "200"): 1,
        (CHAT, "", "404"): 1,
        (CHAT, "", "400"): 1,
        ("/api/chat", "", "400"): 1,
        ("unmatched", "", "404"): 1,
        (CHAT, "", "405"): 1,
    }
    assert requests(scrape(http))[("/metrics", "", "200")] == 1  # the scrape before this one


def test_labels_stay_bounded_whatever_clients_send(http):
    for i in range(20):
        http.post(CHAT, json={"model": f"hostile-{i}:x", "messages": HI})
        http.post("/api/generate", json={"model": f"hostile-{i}", "prompt": "hi"})
        http.get(f"/v1/models/hostile-{i}")
        http.get(f"/hostile/{i}")
        http.post(f"/api/blobs/sha256:{i:064x}", content=b"x")
    counted = requests(scrape(http))
    assert not any("hostile" in label for key in counted for label in key), counted
    assert set(counted) == {
        (CHAT, "", "404"),
        ("/api/generate", "", "404"),
        (MODEL, "", "404"),
        ("unmatched", "", "404"),
        ("/api/blobs/{digest}", "", "400"),  # this backend has no blob directory
    }
    assert all(n == 20 for n in counted.values()), counted


def test_a_refused_key_is_counted_under_the_route_it_asked_for(backend, tmp_path):
    _, key = KeyFile(keys_path(tmp_path)).create("admin")
    app = build_api(backend, keyring=Keyring(keys_path(tmp_path)))
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.post(CHAT, json={"model": A, "messages": HI}).status_code == 401
        assert http.get(f"/v1/models/{A}").status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/").status_code == 200  # open
        http.headers["Authorization"] = f"Bearer {key}"
        assert requests(scrape(http)) == {
            (CHAT, "", "401"): 1,
            (MODEL, "", "401"): 1,
            ("/metrics", "", "401"): 1,
            ("/", "", "200"): 1,
        }


def test_token_counters_equal_the_usage_the_responses_report(http):
    prompt = {A: 0, B: 0}
    generated = {A: 0, B: 0}
    generations = {A: 0, B: 0}

    def add(model: str, p: int, g: int | None = None) -> None:
        prompt[model] += p
        if g is not None:
            generated[model] += g
            generations[model] += 1

    body = http.post(CHAT, json={"model": A, "messages": HI, "max_tokens": 5}).json()
    add(A, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    chunks = sse(
        http.post(
            CHAT,
            json={
                "model": B,
                "messages": HI,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    )
    add(B, chunks[-1]["usage"]["prompt_tokens"], chunks[-1]["usage"]["completion_tokens"])
    chunks = sse(
        http.post(
            "/v1/completions",
            json={
                "model": A,
                "prompt": "one two three",
                "stream": True,
                "max_tokens": 7,
                "stream_options": {"include_usage": True},
            },
        )
    )
    add(A, chunks[-1]["usage"]["prompt_tokens"], chunks[-1]["usage"]["completion_tokens"])
    done = http.post(
        "/api/chat",
        json={"model": B, "messages": HI, "stream": False, "options": {"num_predict": 3}},
    ).json()
    add(B, done["prompt_eval_count"], done["eval_count"])
    done = ndjson(http.post("/api/generate", json={"model": A, "prompt": "a b c d"}))[-1]
    add(A, done["prompt_eval_count"], done["eval_count"])
    body = http.post("/v1/embeddings", json={"model": B, "input": ["x y", "z"]}).json()
    add(B, body["usage"]["prompt_tokens"])
    body = http.post("/api/embed", json={"model": A, "input": "p q r"}).json()
    add(A, body["prompt_eval_count"])

    samples = scrape(http)
    for model in (A, B):
        assert value(samples, "corral_prompt_tokens_total", model=model) == prompt[model] > 0
        assert value(samples, "corral_generated_tokens_total", model=model) == generated[model] > 0
        for histogram in (
            "corral_time_to_first_token_seconds",
            "corral_generation_tokens_per_second",
        ):
            count = value(samples, f"{histogram}_count", model=model)
            assert count == generations[model] == 3 - (model == B), (histogram, model)
            assert value(samples, f"{histogram}_sum", model=model) > 0
            assert value(samples, f"{histogram}_bucket", model=model, le="+Inf") == count


def test_the_scrape_carries_placements_nodes_and_events(http):
    assert http.post(CHAT, json={"model": A, "messages": HI}).is_success
    assert http.post("/api/generate", json={"model": B, "prompt": ""}).is_success  # a load
    samples = scrape(http)
    assert value(samples, "corral_controller_up") == 1
    for model in (A, B):
        assert value(samples, "corral_placement_replicas", model=model, node=NODE) == 1
        assert value(samples, "corral_placement_in_flight", model=model, node=NODE) == 0
        assert value(samples, "corral_placement_queued", model=model, node=NODE) == 0
        assert (
            "corral_ingress_in_flight",
            frozenset({("model", model), ("node", NODE)}),
        ) in samples
    assert value(samples, "corral_node_placements", node=NODE) == 2
    assert value(samples, "corral_node_up", node=NODE) == 1
    total = value(samples, "corral_node_ram_total_bytes", node=NODE)
    assert 0 < value(samples, "corral_node_ram_used_bytes", node=NODE) < total
    assert value(samples, "corral_cold_starts_total", model=A, node=NODE, reason="request") == 1
    assert value(samples, "corral_cold_starts_total", model=B, node=NODE, reason="load") == 1

    unload = {"model": B, "prompt": "", "keep_alive": 0, "stream": False}
    assert http.post("/api/generate", json=unload).json()["done_reason"] == "unload"
    samples = scrape(http)
    assert value(samples, "corral_unloads_total", model=B, node=NODE, reason="asked") == 1
    assert value(samples, "corral_node_placements", node=NODE) == 1


def test_in_flight_while_a_stream_runs_and_a_client_that_leaves_still_counts(http):
    body = {"model": SLOW, "messages": HI, "stream": True}
    with http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: a dropped iterator would end the stream
        next(lines)  # the first chunk: the generation runs
        samples = scrape(http)
        assert value(samples, "corral_ingress_in_flight", model=SLOW, node=NODE) == 1
        assert value(samples, "corral_placement_in_flight", model=SLOW, node=NODE) == 1
        assert requests(samples) == {}  # not counted before it ends
    # The client left mid-stream: counted with the status it was sent.
    eventually(lambda: requests(scrape(http)).get((CHAT, SLOW, "200")) == 1, "counted")
    eventually(
        lambda: value(scrape(http), "corral_placement_in_flight", model=SLOW, node=NODE) == 0,
        "the generation was cancelled",
    )


def test_a_client_that_leaves_before_any_response_is_counted_as_499(backend, http):
    # Loaded first: on a busy machine the 0.2 s could otherwise run out during the load,
    # and there would be no generation to cancel.
    backend.replica(SLOW)
    with pytest.raises(httpx.ReadTimeout):  # gives up on a long answer, and hangs up
        http.post(CHAT, json={"model": SLOW, "messages": HI}, timeout=0.2)
    eventually(lambda: requests(scrape(http)).get((CHAT, "", "499")) == 1, "counted")
    eventually(lambda: backend.replicas[SLOW].load().in_flight == 0, "cancelled")


def test_a_controller_that_fails_leaves_the_ingress_metrics(http, backend, monkeypatch):
    assert http.post(CHAT, json={"model": A, "messages": HI}).is_success

    async def restarting() -> dict:
        raise ServiceUnavailable("the controller is restarting")

    async def slow() -> dict:
        await asyncio.sleep(60)
        return {}

    monkeypatch.setattr(metrics_module, "CONTROLLER_TIMEOUT", 0.1)
    for failing in (restarting, slow):
        monkeypatch.setattr(backend, "cluster_metrics", failing)
        samples = scrape(http)
        assert value(samples, "corral_controller_up") == 0
        assert requests(samples)[(CHAT, A, "200")] == 1
        assert value(samples, "corral_generated_tokens_total", model=A) > 0
        assert not series(samples, "corral_node_up")
    monkeypatch.undo()
    assert value(scrape(http), "corral_controller_up") == 1


def test_cluster_families_skip_what_is_unknown():
    # An event kind the ingress does not know cannot arrive: the records are one
    # definition (deployments/views.py) for the controller and the ingress alike.
    with pytest.raises(ValidationError):
        EventCount(kind="newer", model="m:1", node="nas", reason="x", count=1)
    state = ClusterMetrics.model_validate(
        {
            "placements": [],
            "nodes": [
                {
                    "name": "nas",
                    "up": False,
                    "placements": 0,
                    "replicas": 0,
                    "ram_total": None,
                    "ram_used": None,
                    "vram_total": None,
                    "vram_used": None,
                }
            ],
            "events": [
                {"kind": "evict", "model": "m:1", "node": "nas", "reason": "make_room", "count": 2},
            ],
        }
    )
    families = {f.name: f for f in cluster_families(state, {("m:1", "gpu"): 3})}
    assert [s.value for s in families["corral_node_up"].samples] == [0]
    assert not families["corral_node_ram_used_bytes"].samples  # a down node's memory is stale
    [evicted] = families["corral_evictions"].samples
    assert (evicted.name, evicted.labels["reason"], evicted.value) == (
        "corral_evictions_total",
        "make_room",
        2,
    )
    assert sum(len(families[n].samples) for n in metrics_module.EVENT_COUNTERS) == 1
    [mine] = families["corral_ingress_in_flight"].samples
    assert (mine.labels, mine.value) == ({"model": "m:1", "node": "gpu"}, 3)
