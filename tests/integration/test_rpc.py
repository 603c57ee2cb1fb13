"""llama.cpp's RPC backend through Corral's engine: a model split between this process
and an RPC worker process (both on this machine, over 127.0.0.1) answers as the whole
model does, and a worker that cannot be used is an error naming it, not an abort.

No Ray: the worker is ``nodes.rpc.RpcServer`` (``python -m nodes.rpc serve``), the
engine the real one with the starter model (30 layers).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nodes import rpc
from nodes.engine import (
    ChatMessage,
    EngineSpec,
    Finished,
    GenerateRequest,
    RpcPart,
    SamplingParams,
    TextDelta,
    load_engine,
)
from tests.conftest import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not rpc.available(), reason="llama-cpp-python built without -DGGML_RPC=on"),
]

QUESTION = GenerateRequest(
    messages=(ChatMessage("user", "Tell me a short story about a lighthouse keeper."),),
    params=SamplingParams(max_tokens=64, temperature=0.0),
)


def answer(spec: EngineSpec, worker: rpc.RpcServer | None = None) -> tuple[str, Finished]:
    """The greedy answer to QUESTION; with ``worker``, it must hold some of the weights
    while the model is loaded (its memory grows by at least a fifth of the file)."""
    idle = worker_memory(worker)
    engine = load_engine(spec)
    if worker is not None:
        held = worker_memory(worker) - idle
        assert held > Path(spec.path).stat().st_size / 5, f"the worker holds {held} bytes"
    try:
        events = list(engine.generate(engine.encode(QUESTION), QUESTION.params, threading.Event()))
    finally:
        engine.close()
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def worker_memory(worker: rpc.RpcServer | None) -> int:
    return psutil.Process(worker.process.pid).memory_info().rss if worker else 0


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[rpc.RpcServer]:
    folder = tmp_path_factory.mktemp("rpc")
    server = rpc.RpcServer(
        f"127.0.0.1:{free_port()}", str(folder / "cache"), threads=1, log=folder / "rpc.log"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def spec(starter_path: Path, *parts: RpcPart) -> EngineSpec:
    return EngineSpec(
        model="smollm2:135m", path=str(starter_path), n_ctx=1024, n_threads=1, rpc=parts
    )


def test_a_split_model_answers_token_for_token_as_the_whole_one(starter_path, worker):
    whole, done = answer(spec(starter_path))
    split, split_done = answer(spec(starter_path, RpcPart("box2", worker.endpoint, 15)), worker)
    assert done.usage.completion_tokens == 64 and whole
    assert split == whole
    assert split_done.usage == done.usage
    assert worker.alive


def test_the_worker_speaks_this_llama_cpps_protocol(worker):
    assert rpc.check_server(worker.endpoint) == rpc.protocol_version()


def test_a_worker_nobody_answers_is_an_error_naming_it(starter_path):
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(rpc.RpcUnreachable, match=f"nas's RPC worker at {endpoint} does not answer"):
        load_engine(spec(starter_path, RpcPart("nas", endpoint, 10)))


def test_a_worker_of_another_protocol_version_is_an_error_naming_both(starter_path):
    """A server that answers hello with version 99.0.0 (as a newer llama.cpp would)."""
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

    def answer_hello() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 + 8 + rpc.CONN_CAPS)
            conn.sendall(struct.pack("<Q", 4 + rpc.CONN_CAPS) + bytes([99, 0, 0, 0]) + bytes(24))

    thread = threading.Thread(target=answer_hello, daemon=True)
    thread.start()
    try:
        with pytest.raises(rpc.RpcUnreachable, match=r"speaks llama.cpp RPC protocol 99\.0\.0"):
            load_engine(spec(starter_path, RpcPart("nas", endpoint, 10)))
    finally:
        listener.close()
        thread.join(timeout=5)


LENDER_PORTS = (50052, 50071)  # a range, as the firewall would open it between the hosts


def test_a_lender_actor_on_a_box_serves_layers_and_its_server_dies_with_it(
    homelab, starter_path, tmp_path
):
    """The RPC worker as the controller runs it: a Ray actor pinned to a box, holding the
    memory of the layers it lends, listening on the box's address."""
    import ray

    from nodes.agent import LABEL_NODE

    [nas] = [n for n in ray.nodes() if n["Alive"] and n["Labels"].get(LABEL_NODE) == "nas"]
    host = nas["NodeManagerAddress"]
    lender = (
        ray.remote(rpc.RpcLender)
        .options(label_selector={LABEL_NODE: "nas"}, num_cpus=0, memory=200 * 1024**2)
        .remote(host, LENDER_PORTS, str(tmp_path / "cache"), 1)
    )
    endpoint = ray.get(lender.endpoint.remote(), timeout=60)
    assert endpoint.rsplit(":", 1)[0] == host
    assert LENDER_PORTS[0] <= int(endpoint.rsplit(":", 1)[1]) <= LENDER_PORTS[1]
    server = psutil.Process(ray.get(lender.pid.remote()))
    assert server.is_running()

    whole, _ = answer(spec(starter_path))
    split, _ = answer(spec(starter_path, RpcPart("nas", endpoint, 20)))
    assert split == whole

    ray.kill(lender)  # the actor's process dies at once: its server must follow
    server.wait(timeout=30)
    assert not server.is_running()
