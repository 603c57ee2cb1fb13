"""/metrics of the real server: the session's Corral on its three-node cluster, real llama.cpp.

Other tests share the server, so this compares two scrapes around its own
requests: the deltas must equal the requests it made and the usage the
responses reported. Both scrapes are parsed with prometheus_client's parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodes.models import STARTER_MODEL

MODEL = STARTER_MODEL
ASK = [{"role": "user", "content": "Name three colours."}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def http(corral) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=corral.url, timeout=120) as client:
        # Load the model (if no earlier test did), so that every request below is served.
        r = client.post(CHAT, json={"model": MODEL, "messages": ASK, "max_tokens": 1})
        assert r.status_code == 200, r.text
        yield client


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_counters_match_the_requests_made_and_the_usage_returned(http):
    usages: list[tuple[int, int]] = []  # (prompt, generated) of each generation
    before = scrape(http)

    # OpenAI: N = 4 (two whole chats, a streamed chat, a completion), and one unknown model.
    for _ in range(2):
        body = http.post(CHAT, json={"model": MODEL, "messages": ASK, "max_tokens": 8}).json()
        usages.append((body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]))
    streamed = http.post(
        CHAT,
        json={
            "model": MODEL,
            "messages": ASK,
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    usages.append((usage["prompt_tokens"], usage["completion_tokens"]))
    body = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "Red, green,", "max_tokens": 6})
    usage = body.json()["usage"]
    usages.append((usage["prompt_tokens"], usage["completion_tokens"]))
    missing = http.post(CHAT, json={"model": "no-such-model:1b", "messages": ASK})
    assert missing.status_code == 404

    # Ollama: M = 2 (a whole chat, a streamed generate).
    options = {"num_predict": 8}
    done = http.post(
        "/api/chat", json={"model": MODEL, "messages": ASK, "stream": False, "options": options}
    ).json()
    usages.append((done["prompt_eval_count"], done["eval_count"]))
    lines = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "options": options})
    done = json.loads(lines.text.splitlines()[-1])
    assert done["done"], done
    usages.append((done["prompt_eval_count"], done["eval_count"]))

    after = scrape(http)
    requests = "corral_requests_total"
    assert delta(before, after, requests, route=CHAT, model=MODEL, status="200") == 3
    assert delta(before, after, requests, route=COMPLETIONS, model=MODEL, status="200") == 1
    assert delta(before, after, requests, route=CHAT, model="", status="404") == 1
    assert delta(before, after, requests, route="/api/chat", model=MODEL, status="200") == 1
    assert delta(before, after, requests, route="/api/generate", model=MODEL, status="200") == 1
    assert delta(before, after, requests, route="/metrics", model="", status="200") == 1

    prompt = sum(p for p, _ in usages)
    generated = sum(g for _, g in usages)
    assert delta(before, after, "corral_prompt_tokens_total", model=MODEL) == prompt > 0
    assert delta(before, after, "corral_generated_tokens_total", model=MODEL) == generated > 0
    ttft = "corral_time_to_first_token_seconds_count"
    assert delta(before, after, ttft, model=MODEL) == len(usages)
    speed = "corral_generation_tokens_per_second_count"
    assert delta(before, after, speed, model=MODEL) == sum(1 for _, g in usages if g >= 2)


def test_the_scrape_shows_every_node_and_the_placements(http):
    listed = http.get("/api/cluster/nodes").json()["nodes"]
    # Other tests add and remove nodes of the session's cluster: those stay listed, down.
    nodes = {n["name"]: n for n in listed if n["state"] == "up"}
    assert set(nodes) >= {"gpubox", "minipc"} and len(nodes) >= 3, listed
    samples = scrape(http)
    assert samples[("corral_controller_up", frozenset())] == 1
    for family in ("corral_node_up", "corral_node_placements"):
        shown = {dict(labels)["node"] for labels in labelled(samples, family)}
        assert shown == {n["name"] for n in listed}, family
    for name in {n["name"] for n in listed}:
        up = samples[("corral_node_up", frozenset({("node", name)}))]
        assert up == (1 if name in nodes else 0), name
    shown = {dict(labels)["node"] for labels in labelled(samples, "corral_node_ram_total_bytes")}
    assert shown == set(nodes)  # memory only of the nodes that are up
    for name, node in nodes.items():
        ram = samples[("corral_node_ram_total_bytes", frozenset({("node", name)}))]
        assert ram == node["ram_total"] > 0
        assert 0 < samples[("corral_node_ram_used_bytes", frozenset({("node", name)}))] <= ram
    placed = {
        dict(labels)["node"]: n
        for labels, n in labelled(samples, "corral_placement_replicas").items()
        if dict(labels)["model"] == MODEL
    }
    assert placed and all(n >= 1 for n in placed.values()), placed
    for node in placed:
        where = frozenset({("node", node)})
        assert samples[("corral_node_placements", where)] >= 1
        for family in ("corral_placement_in_flight", "corral_ingress_in_flight"):
            assert (family, frozenset({("model", MODEL), ("node", node)})) in samples, family
