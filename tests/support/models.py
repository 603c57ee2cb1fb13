"""GGUF facts of real models, for planner tests and benchmarks without the files.

Shapes come from the models' published configs; byte sizes are those of the
Q4_K_M files on the Ollama library (rounded), split the way llama.cpp's
quantization mixes split them (token embeddings, blocks, head).
"""

from __future__ import annotations

from cluster.planner import PlanNode
from nodes.agent import NodeSettings, plan_offer
from nodes.gguf import GgufInfo
from nodes.hardware import load_inventory

MB = 1000**2


def synthetic_gguf(
    name: str,
    *,
    layers: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_vocab: int,
    file_bytes: int,
    n_ctx_train: int = 8192,
    tied: bool = False,
    embd_bytes_per_value: float = 0.5625,  # Q4_K
    head_bytes_per_value: float = 0.8203,  # Q6_K
) -> GgufInfo:
    """A ``GgufInfo`` for a model of this shape whose file weighs ``file_bytes``."""
    input_bytes = int(n_vocab * n_embd * embd_bytes_per_value)
    output_bytes = 4 * n_embd + (0 if tied else int(n_vocab * n_embd * head_bytes_per_value))
    per_layer = (file_bytes - input_bytes - output_bytes) // layers
    head_dim = n_embd // n_head
    return GgufInfo(
        path=f"/models/{name.replace(':', '-')}.gguf",
        file_size=file_bytes,
        architecture="llama",
        name=name,
        parameters=0,
        quantization="Q4_K_M",
        n_layers=layers,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=(n_head_kv,) * layers,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_vocab=n_vocab,
        layer_bytes=(per_layer,) * layers,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_head_bytes=input_bytes if tied else 0,
        embedding_model=False,
    )


# name -> GgufInfo of well-known models (Q4_K_M)
LIBRARY: dict[str, GgufInfo] = {
    "llama3.2:1b": synthetic_gguf(
        "llama3.2:1b",
        layers=16,
        n_embd=2048,
        n_head=32,
        n_head_kv=8,
        n_vocab=128256,
        file_bytes=808 * MB,
        n_ctx_train=131072,
        tied=True,
    ),
    "llama3.2:3b": synthetic_gguf(
        "llama3.2:3b",
        layers=28,
        n_embd=3072,
        n_head=24,
        n_head_kv=8,
        n_vocab=128256,
        file_bytes=2019 * MB,
        n_ctx_train=131072,
        tied=True,
    ),
    "llama3.1:8b": synthetic_gguf(
        "llama3.1:8b",
        layers=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        n_vocab=128256,
        file_bytes=4920 * MB,
        n_ctx_train=131072,
    ),
    "qwen2.5:14b": synthetic_gguf(
        "qwen2.5:14b",
        layers=48,
        n_embd=5120,
        n_head=40,
        n_head_kv=8,
        n_vocab=152064,
        file_bytes=8990 * MB,
        n_ctx_train=32768,
    ),
    "qwen2.5:32b": synthetic_gguf(
        "qwen2.5:32b",
        layers=64,
        n_embd=5120,
        n_head=40,
        n_head_kv=8,
        n_vocab=152064,
        file_bytes=19850 * MB,
        n_ctx_train=32768,
    ),
    "llama3.3:70b": synthetic_gguf(
        "llama3.3:70b",
        layers=80,
        n_embd=8192,
        n_head=64,
        n_head_kv=8,
        n_vocab=128256,
        file_bytes=42520 * MB,
        n_ctx_train=131072,
    ),
}


def fixture_node(fixture: str, role: str = "worker", **settings) -> PlanNode:
    """The planner's view of the box a node fixture describes, offered as
    ``corral node start`` would offer it (default reserves unless ``settings``)."""
    from tests.conftest import NODE_FIXTURES

    inventory = load_inventory(NODE_FIXTURES / f"{fixture}.yaml")
    offer = plan_offer(inventory, NodeSettings(**settings), role)
    return PlanNode(
        name=offer.name,
        up=True,
        ram=offer.memory,
        vram=offer.vram_mib * 1024**2,
        gpus=offer.num_gpus,
        cores=inventory.cpu_cores,
        labels=offer.labels,
    )


def homelab_nodes() -> list[PlanNode]:
    """The test homelab (tests/conftest.py HOMELAB): minipc head, gpubox, nas."""
    from tests.conftest import HOMELAB

    return [fixture_node(fixture, role) for fixture, role in HOMELAB]
