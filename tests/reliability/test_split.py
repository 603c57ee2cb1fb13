"""A model no single box holds, split over two (llama.cpp RPC over 127.0.0.1), on the
simulated homelab with the real engine.

Three small boxes join for this module (``split-a``, ``split-b``, ``split-c``), each
offering 80% of the memory one replica of the split model needs, so the planner must
split it: the main replica on one box, the last layers on an RPC worker on another.
The same GGUF with the same settings runs whole on a big box for comparison.

1. ``corral apply`` says it splits and how; the split model answers the same greedy
   text as the whole one, token for token, through the OpenAI and Ollama clients.
2. The box that lends the layers is unplugged mid-stream: the stream ends with an
   error within seconds, the controller says it lost the placement and splits the
   model again over the boxes left, whose answer is still the whole model's.
3. The RPC worker's process dies while its box stays up: the stream ends, the loss
   names the worker (not the box), and the model is split again.

It lives with the drills: the box it unplugs stays listed (down) for the session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import ollama
import pytest
import ray

from cluster.lenders import PREFIX as LENDER_PREFIX
from nodes import rpc
from nodes.gguf import estimate_memory, read_gguf
from tests.conftest import simulated_node
from tests.support.cluster import apply_models, events, models_file, placements, wait_for
from tests.support.streams import start_stream

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not rpc.available(), reason="llama-cpp-python built without -DGGML_RPC=on"),
]

A, B, C = "split-a", "split-b", "split-c"
SPLIT, WHOLE = "smollm2-split:latest", "smollm2-whole:latest"
CONTEXT = 2048
SETTINGS = {"source": "{starter}", "context": str(CONTEXT), "parallel": "1", "threads": "1"}
MESSAGES = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
BOUND = 10.0  # seconds: a stream whose box is unplugged ends within this


def entry(name: str, **fields: str) -> str:
    lines = [f"  - name: {name}"] + [f"    {k}: {v}" for k, v in {**SETTINGS, **fields}.items()]
    return "\n".join(lines) + "\n"


MODELS = models_file(
    entry("smollm2-split", placement=f"{{nodes: [{A}, {B}, {C}]}}"),
    entry("smollm2-whole", placement="{nodes: [gpubox]}"),
)


def up(corral) -> set[str]:
    nodes = httpx.get(f"{corral.url}/api/cluster/nodes", timeout=30).json()["nodes"]
    return {n["name"] for n in nodes if n["state"] == "up"}


def lenders() -> set[str]:
    return {n for n in ray.util.list_named_actors() if n.startswith(LENDER_PREFIX)}


@pytest.fixture(scope="module")
def boxes(corral, homelab, tmp_path_factory, starter_path) -> Iterator[dict]:
    """The three small boxes (by name) with the models applied; gone when the module ends."""
    whole = estimate_memory(read_gguf(starter_path), CONTEXT, parallel=1).ram
    nodes = {}
    for name in (A, B, C):
        args = simulated_node("nas-ram8g", "worker", name)
        nodes[name] = homelab.cluster.add_node(**{**args, "memory": int(whole * 0.8)})
    root = tmp_path_factory.mktemp("split")
    try:
        wait_for(lambda: {A, B, C} <= up(corral), 60, "the small boxes to join")
        report = apply_models(MODELS, root / "models.yaml", starter_path)
        nodes["report"] = report
        yield nodes
    finally:
        apply_models("models: []\n", root / "empty.yaml", starter_path)
        for name in (A, B, C):
            if nodes[name] is not None and nodes[name].remaining_processes_alive():
                homelab.cluster.remove_node(nodes[name], allow_graceful=False)
        wait_for(lambda: not {A, B, C} & up(corral), 30, "the small boxes to show down")
        wait_for(lambda: not lenders(), 30, "the RPC workers to stop")


def greedy(openai_client, model: str) -> str:
    reply = openai_client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=64, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"  # 64 tokens, all of them
    return reply.choices[0].message.content


def greedy_ollama(corral, model: str) -> str:
    client = ollama.Client(host=corral.url, timeout=120)
    reply = client.chat(
        model=model, messages=MESSAGES, options={"num_predict": 64, "temperature": 0}
    )
    return reply.message.content


def test_a_model_no_box_holds_is_split_and_answers_as_the_whole_model(corral, boxes, openai_client):
    [change] = [c for c in boxes["report"].changes if c.placement.model == SPLIT]
    line = change.describe()
    assert line.startswith(f"+ {SPLIT} on {A}: split: {A} "), line
    assert f" + {B} " in line and C not in line, line  # two boxes are enough
    row = placements(corral, SPLIT)[A]
    assert row["status"] == "RUNNING" and [p["node"] for p in row["parts"]] == [B]
    assert row["layers"] + row["parts"][0]["layers"] == 31  # 30 blocks and the output
    assert {name.rpartition("@")[2] for name in lenders()} == {B}

    whole = greedy(openai_client, WHOLE)
    assert greedy(openai_client, SPLIT) == whole
    # Ollama's defaults differ (repeat_penalty 1.1 ...): the same there, split or not
    assert greedy_ollama(corral, SPLIT) == greedy_ollama(corral, WHOLE)


def test_the_lending_box_unplugged_mid_stream_ends_it_and_the_model_is_split_again(
    corral, homelab, boxes, openai_client
):
    whole = greedy(openai_client, WHOLE)
    stream = start_stream(corral.url, SPLIT, messages=MESSAGES, max_tokens=1500, temperature=0)
    wait_for(lambda: stream.content >= 2, 60, "the split model's stream to flow")
    since, unplugged = time.time(), time.monotonic()
    homelab.cluster.remove_node(boxes[B], allow_graceful=False)
    boxes[B] = None  # gone for good
    wait_for(lambda: stream.ended_at, 60, "the stream to end")
    ended_in = stream.ended_at - unplugged
    print(f"\nthe split model's stream ended {ended_in:.1f} s after {B} was unplugged")
    assert stream.error is not None and stream.failure is None, stream.events[-2:]
    assert ended_in < BOUND

    [lost] = wait_for(lambda: events(since, SPLIT, "lost"), 30, "the lost placement")
    assert lost["node"] == A and f"{B} left the cluster" in lost["reason"], lost
    wait_for(lambda: events(since, SPLIT, "replace"), 120, "the model split again")
    row = placements(corral, SPLIT)[A]
    assert [p["node"] for p in row["parts"]] == [C], row
    wait_for(lambda: {n.rpartition("@")[2] for n in lenders()} == {C}, 30, "one RPC worker")
    assert greedy(openai_client, SPLIT) == whole


def test_a_crashed_rpc_worker_on_a_live_box_is_named_and_the_model_is_split_again(
    corral, boxes, openai_client
):
    whole = greedy(openai_client, WHOLE)
    [name] = lenders()
    assert name.endswith(f"@{C}"), name
    stream = start_stream(corral.url, SPLIT, messages=MESSAGES, max_tokens=1500, temperature=0)
    wait_for(lambda: stream.content >= 2, 60, "the split model's stream to flow")
    since = time.time()
    ray.kill(ray.get_actor(name))  # its process dies; the box stays up
    wait_for(lambda: stream.ended_at, 60, "the stream to end")
    assert stream.error is not None and stream.failure is None, stream.events[-2:]

    [lost] = wait_for(lambda: events(since, SPLIT, "lost"), 30, "the lost placement")
    assert lost["node"] == A and lost["reason"] == f"its RPC worker on {C} stopped", lost
    assert C in up(corral)
    wait_for(lambda: events(since, SPLIT, "replace"), 120, "the model split again")
    assert [p["node"] for p in placements(corral, SPLIT)[A]["parts"]] == [C]
    wait_for(lambda: len(lenders()) == 1, 30, "one RPC worker")
    assert greedy(openai_client, SPLIT) == whole
