"""The planner on the test homelab: where each model goes, with how much memory, and why not.

The homelab is the one tests/conftest.py simulates, offered as ``corral node start``
would offer it: minipc (head, 13.2 GiB, no GPU), gpubox (61.0 GiB and an RTX 3090
with 23.5 GiB) and nas (5.6 GiB). Models are tests/support/models.py LIBRARY
(Q4_K_M shapes); at the default context of 4096 one replica on the CPU needs
about 1.3 GiB (llama3.2:1b), 2.7 GiB (3b), 5.5 GiB (llama3.1:8b), 9.7 GiB
(qwen2.5:14b), 20 GiB (qwen2.5:32b) and 42 GiB (llama3.3:70b).

Memory figures in expected texts come from ``nodes.gguf``'s estimates, so that
the tests check the planner's choices and wording, not the estimator's numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace

import pytest

from cluster.planner import (
    GIB,
    MIB,
    RPC_OVERHEAD,
    Change,
    Placement,
    Plan,
    PlanNode,
    Unplaced,
    describe_placement,
    diff,
    human_bytes,
    plan,
)
from cluster.spec import ModelSpec, Replicas
from nodes.engine import DEFAULT_PARALLEL, LlamaSettings
from nodes.gguf import GgufInfo, MemoryEstimate
from nodes.gguf import estimate_memory as _estimate_memory
from nodes.gguf import fit_gpu_layers as _fit_gpu_layers
from tests.support.models import LIBRARY, fixture_node, homelab_nodes


def estimate_memory(info: GgufInfo, context: int, **kwargs) -> MemoryEstimate:
    """The estimate of one replica as a llama.cpp ModelSpec with defaults runs it."""
    return _estimate_memory(info, context, parallel=DEFAULT_PARALLEL, **kwargs)


def fit_gpu_layers(info: GgufInfo, context: int, vram: int, **kwargs) -> MemoryEstimate:
    return _fit_gpu_layers(info, context, vram, parallel=DEFAULT_PARALLEL, **kwargs)


def homelab(*, down: Sequence[str] = ()) -> list[PlanNode]:
    """minipc, gpubox, nas (in that order), with the nodes named in ``down`` down."""
    return [replace(n, up=False) if n.name in down else n for n in homelab_nodes()]


def node(name: str) -> PlanNode:
    return next(n for n in homelab_nodes() if n.name == name)


def run(
    specs: Sequence[ModelSpec],
    nodes: Sequence[PlanNode] | None = None,
    current: Sequence[Placement] = (),
    **kwargs,
) -> Plan:
    return plan(homelab() if nodes is None else nodes, specs, current, models=LIBRARY, **kwargs)


# The fixture nas (5.6 GiB) takes one 8b or two 3b replicas at context 4096 when their
# compute and output buffers are sized for 256-token micro-batches (512 by default).
SMALL_BATCH = {"ubatch": 256}


def ram(model: str, context: int = 4096, llama: dict | None = None) -> int:
    """RAM of one replica of ``model`` on the CPU (with ``llama`` settings)."""
    settings = LlamaSettings(**(llama or {}))
    return estimate_memory(LIBRARY[model], context, llama=settings).ram


def whole_on_gpu(model: str, context: int = 4096) -> MemoryEstimate:
    info = LIBRARY[model]
    return estimate_memory(info, context, gpu_layers=info.n_layers + 1)


def only(result: Plan, model: str) -> Placement:
    """The one placement of ``model`` in ``result``."""
    (placement,) = result.for_model(model)
    return placement


def where(result: Plan, model: str) -> dict[str, int]:
    """Replicas of ``model`` by node."""
    return {p.node: p.replicas for p in result.for_model(model)}


def test_the_homelab_offers_what_node_start_would():
    minipc, gpubox, nas = homelab_nodes()
    assert [n.name for n in (minipc, gpubox, nas)] == ["minipc", "gpubox", "nas"]
    assert [human_bytes(n.ram) for n in (minipc, gpubox, nas)] == [
        "13.2 GiB",
        "61.0 GiB",
        "5.6 GiB",
    ]
    assert gpubox.vram == (24 * 1024 - 512) * MIB  # the 3090 minus the 512 MiB reserve
    assert (gpubox.gpus, gpubox.cores) == (1, 8)
    assert minipc.vram == nas.vram == 0
    assert minipc.labels["corral.role"] == "head" and gpubox.labels["corral.role"] == "worker"


# -- where a model goes ------------------------------------------------------------


def test_a_small_model_goes_whole_onto_the_gpu():
    result = run([ModelSpec(name="llama3.2:3b")])
    p = only(result, "llama3.2:3b")
    info = LIBRARY["llama3.2:3b"]
    expected = whole_on_gpu("llama3.2:3b")
    assert (p.node, p.replicas, p.gpu_layers) == ("gpubox", 1, 29)  # 28 blocks + the head
    assert (p.context, p.threads, p.path) == (4096, 8, info.path)  # threads: gpubox's cores
    assert (p.ram, p.vram) == (expected.ram, expected.vram)
    assert p.reason == "spread: fits gpubox with GPU"
    assert result.unplaced == () and result.notes == ()


def test_full_offload_stays_within_the_vram_offer():
    p = only(run([ModelSpec(name="llama3.1:8b")]), "llama3.1:8b")
    info = LIBRARY["llama3.1:8b"]
    assert (p.node, p.gpu_layers) == ("gpubox", info.n_layers + 1)
    assert p.vram <= node("gpubox").vram
    assert p.vram == whole_on_gpu("llama3.1:8b").vram
    # only the token embeddings, buffers and saved prompts stay in RAM (the output buffer
    # is host memory; the prompt cache too: a quarter of the 512 MiB KV cache)
    cache = whole_on_gpu("llama3.1:8b").cache_ram
    assert cache == 128 * MIB
    assert p.ram - cache < 640 * MIB


def test_a_70b_model_is_split_between_vram_and_ram():
    p = only(run([ModelSpec(name="llama3.3:70b")]), "llama3.3:70b")
    info = LIBRARY["llama3.3:70b"]
    gpubox = node("gpubox")
    assert p.node == "gpubox"
    assert 0 < p.gpu_layers < info.n_layers + 1
    assert p.gpu_layers == fit_gpu_layers(info, 4096, gpubox.vram).gpu_layers
    # the most layers that fit: one more would not
    assert p.vram <= gpubox.vram
    assert estimate_memory(info, 4096, gpu_layers=p.gpu_layers + 1).vram > gpubox.vram
    # RAM holds the other blocks and the embeddings
    assert p.ram == estimate_memory(info, 4096, gpu_layers=p.gpu_layers).ram
    assert 10 * GIB < p.ram <= gpubox.ram
    assert p.reason == f"spread: fits gpubox with {p.gpu_layers}/81 layers on GPU"


def test_a_model_that_fits_nowhere_says_what_it_needs_and_why_each_node_refused():
    spec = ModelSpec(
        name="llama3.3:70b",
        placement={"gpu": "never", "nodes": ["minipc", "nas"], "split": "never"},
    )
    result = run([spec])
    assert result.placements == ()
    assert result.unplaced == (
        Unplaced(
            model="llama3.3:70b",
            wanted=1,
            placed=0,
            reason=f"needs {human_bytes(ram('llama3.3:70b'))} RAM (context 4096, on the CPU); "
            "minipc has 13.2 GiB free; gpubox is excluded by placement.nodes; "
            "nas has 5.6 GiB free",
        ),
    )


def test_gpu_never_runs_on_the_cpu_of_the_tightest_node():
    spec = ModelSpec(name="llama3.1:8b", placement={"gpu": "never"}, llama=SMALL_BATCH)
    p = only(run([spec]), "llama3.1:8b")
    # every node could take it; the nas leaves the least room unused
    assert (p.node, p.gpu_layers, p.vram) == ("nas", 0, 0)
    assert p.ram == ram("llama3.1:8b", llama=SMALL_BATCH)
    assert p.reason == "spread: fits nas with CPU"


def test_gpu_never_on_the_gpu_box_leaves_its_vram_alone():
    spec = ModelSpec(name="qwen2.5:14b", placement={"gpu": "never", "nodes": ["gpubox"]})
    p = only(run([spec]), "qwen2.5:14b")
    assert (p.node, p.gpu_layers, p.vram, p.ram) == ("gpubox", 0, 0, ram("qwen2.5:14b"))


def test_gpu_required_uses_only_the_gpu_box():
    spec = ModelSpec(name="llama3.2:1b", replicas=2, placement={"gpu": "required"})
    result = run([spec])
    # spread would prefer two nodes, but only one has a GPU: both replicas go there
    p = only(result, "llama3.2:1b")
    assert (p.node, p.replicas, p.gpu_layers) == ("gpubox", 2, 17)
    assert 2 * p.vram <= node("gpubox").vram
    assert result.unplaced == ()


def test_gpu_required_without_a_gpu_node():
    nodes = [node("minipc"), node("nas"), fixture_node("laptop-i5-8250u-ram8g")]
    result = run([ModelSpec(name="llama3.1:8b", placement={"gpu": "required"})], nodes)
    assert result.placements == ()
    (missing,) = result.unplaced
    assert missing.reason == (
        f"needs {human_bytes(whole_on_gpu('llama3.1:8b').vram)} VRAM (context 4096, on the GPU); "
        "minipc has no GPU (placement.gpu is required); "
        "nas has no GPU (placement.gpu is required); "
        "laptop has no GPU (placement.gpu is required)"
    )


def test_gpu_required_for_a_model_larger_than_the_vram():
    result = run([ModelSpec(name="llama3.3:70b", placement={"gpu": "required"})])
    (missing,) = result.unplaced
    vram = human_bytes(whole_on_gpu("llama3.3:70b").vram)
    assert missing.reason == (
        f"needs {vram} VRAM (context 4096, on the GPU); "
        "minipc has no GPU (placement.gpu is required); "
        f"gpubox has 23.5 GiB VRAM free, needs {vram} for the whole model; "
        "nas has no GPU (placement.gpu is required)"
    )


def test_placement_nodes_is_an_allow_list():
    spec = ModelSpec(name="llama3.2:3b", placement={"nodes": ["nas"]})
    p = only(run([spec]), "llama3.2:3b")
    assert (p.node, p.gpu_layers, p.threads) == ("nas", 0, 4)  # not the GPU box


def test_labels_must_all_match():
    no_gpu = ModelSpec(name="llama3.2:3b", replicas=2, placement={"labels": {"corral.gpu": "none"}})
    head = ModelSpec(name="qwen2.5:14b", placement={"labels": {"corral.role": "head"}})
    result = run([no_gpu, head])
    assert where(result, "llama3.2:3b") == {"minipc": 1, "nas": 1}
    assert where(result, "qwen2.5:14b") == {"minipc": 1}


def test_a_label_mismatch_is_named_in_the_reason():
    spec = ModelSpec(name="qwen2.5:32b", placement={"labels": {"corral.role": "head"}})
    (missing,) = run([spec]).unplaced
    assert missing.reason == (
        f"needs {human_bytes(ram('qwen2.5:32b'))} RAM (context 4096, on the CPU); "
        "minipc has 13.2 GiB free; "
        "gpubox has label corral.role=worker, not head; nas has label corral.role=worker, not head"
    )


def test_default_context_and_threads_apply_where_a_spec_sets_none():
    specs = [
        ModelSpec(name="llama3.2:1b", placement={"nodes": ["nas"]}),
        ModelSpec(name="llama3.2:3b", context=8192, threads=3, placement={"nodes": ["nas"]}),
    ]
    result = run(specs, default_context=2048, default_threads=2)
    assert (only(result, "llama3.2:1b").context, only(result, "llama3.2:1b").threads) == (2048, 2)
    assert (only(result, "llama3.2:3b").context, only(result, "llama3.2:3b").threads) == (8192, 3)


# -- replicas ------------------------------------------------------------------------


def test_spread_puts_replicas_on_different_nodes():
    result = run([ModelSpec(name="llama3.2:3b", replicas=2)])
    assert where(result, "llama3.2:3b") == {"gpubox": 1, "nas": 1}
    by_node = {p.node: p for p in result.for_model("llama3.2:3b")}
    assert by_node["gpubox"].gpu_layers == 29 and by_node["nas"].gpu_layers == 0


def test_pack_puts_replicas_together_when_they_fit():
    result = run([ModelSpec(name="llama3.2:3b", replicas=2, placement={"strategy": "pack"})])
    p = only(result, "llama3.2:3b")
    assert (p.node, p.replicas, p.gpu_layers) == ("gpubox", 2, 29)
    assert p.reason == "pack: fits gpubox with GPU"


def test_replicas_on_one_gpu_share_its_vram():
    """Replicas on one node share one setting: each gets the layers that fit half the VRAM."""
    spec = ModelSpec(
        name="qwen2.5:32b", replicas=2, placement={"strategy": "pack", "nodes": ["gpubox"]}
    )
    p = only(run([spec]), "qwen2.5:32b")
    info, gpubox = LIBRARY["qwen2.5:32b"], node("gpubox")
    assert p.replicas == 2
    assert p.gpu_layers == fit_gpu_layers(info, 4096, gpubox.vram // 2).gpu_layers
    assert 0 < p.gpu_layers < fit_gpu_layers(info, 4096, gpubox.vram).gpu_layers  # alone: more
    assert 2 * p.vram <= gpubox.vram and 2 * p.ram <= gpubox.ram


def test_three_replicas_over_three_nodes():
    spec = ModelSpec(
        name="llama3.1:8b", replicas={"min": 3}, placement={"gpu": "never"}, llama=SMALL_BATCH
    )
    result = run([spec])
    assert where(result, "llama3.1:8b") == {"gpubox": 1, "minipc": 1, "nas": 1}
    assert result.unplaced == ()


def test_spread_stacks_replicas_when_nodes_run_out():
    result = run(
        [
            ModelSpec(
                name="llama3.2:3b",
                replicas=3,
                placement={"nodes": ["minipc", "nas"]},
                llama=SMALL_BATCH,
            )
        ]
    )
    # one on each, then the tightest fit: the nas has less left than the minipc
    assert where(result, "llama3.2:3b") == {"minipc": 1, "nas": 2}


def test_a_model_short_of_replicas_gets_what_is_left():
    spec = ModelSpec(name="llama3.1:8b", replicas=4, placement={"gpu": "never"}, llama=SMALL_BATCH)
    result = run([spec], [node("minipc"), node("nas")])
    eight = ram("llama3.1:8b", llama=SMALL_BATCH)
    assert where(result, "llama3.1:8b") == {"minipc": 2, "nas": 1}
    assert result.unplaced == (
        Unplaced(
            model="llama3.1:8b",
            wanted=4,
            placed=3,
            reason=f"needs {human_bytes(eight)} RAM (context 4096, on the CPU); "
            "minipc has room for 2, not 3: "
            f"13.2 GiB RAM for them, 3 need {human_bytes(3 * eight)} (context 4096, on the CPU); "
            "nas has room for 1, not 2: "
            f"5.6 GiB RAM for them, 2 need {human_bytes(2 * eight)} (context 4096, on the CPU)",
        ),
    )


def test_a_model_short_of_replicas_does_not_crowd_out_others():
    """The 8b model cannot get its four replicas: its first three would fill both nodes and
    leave the 3b model out. It gives them back, the 3b model is placed, then it takes the rest."""
    short = ModelSpec(name="llama3.1:8b", replicas=4, placement={"gpu": "never"})
    small = ModelSpec(name="llama3.2:3b")
    result = run([short, small], [node("minipc"), node("nas")])
    assert where(result, "llama3.2:3b") == {"nas": 1}
    assert where(result, "llama3.1:8b") == {"minipc": 2}
    assert [(u.model, u.wanted, u.placed) for u in result.unplaced] == [("llama3.1:8b", 4, 2)]


def test_pinned_models_are_placed_first_when_memory_is_short():
    nas = [node("nas")]  # room for the 8b model or the 3b model, not both
    big = ModelSpec(name="llama3.1:8b", llama=SMALL_BATCH)
    small = ModelSpec(name="llama3.2:3b", llama=SMALL_BATCH)
    assert where(run([big, small], nas), "llama3.1:8b") == {"nas": 1}  # largest first
    pinned = run([big, small.model_copy(update={"pinned": True})], nas)
    assert where(pinned, "llama3.2:3b") == {"nas": 1}
    assert pinned.unplaced == (
        Unplaced(
            "llama3.1:8b",
            1,
            0,
            f"needs {human_bytes(ram('llama3.1:8b', llama=SMALL_BATCH))} RAM (context 4096, "
            f"on the CPU); nas has "
            f"{human_bytes(node('nas').ram - ram('llama3.2:3b', llama=SMALL_BATCH))} free",
        ),
    )


# -- nodes going down, re-planning ---------------------------------------------------


def test_a_down_node_is_never_used_and_is_named():
    big = ModelSpec(name="llama3.3:70b", placement={"split": "never"})
    result = run([ModelSpec(name="llama3.2:3b"), big], homelab(down=["gpubox"]))
    assert all(p.node != "gpubox" for p in result.placements)
    assert where(result, "llama3.2:3b") == {"nas": 1}
    (missing,) = result.unplaced
    assert missing.reason == (
        f"needs {human_bytes(ram('llama3.3:70b'))} RAM (context 4096, on the CPU); "
        "minipc has 13.2 GiB free; gpubox is down; "
        f"nas has {human_bytes(node('nas').ram - ram('llama3.2:3b'))} free"
    )


SPECS = [
    ModelSpec(name="llama3.3:70b"),
    ModelSpec(name="qwen2.5:14b"),
    ModelSpec(name="llama3.2:3b", replicas=2),
    ModelSpec(name="llama3.2:1b", placement={"labels": {"corral.role": "head"}}),
]


def test_re_planning_the_same_specs_changes_nothing():
    first = run(SPECS)
    assert len(first.placements) == 5 and first.unplaced == ()
    again = run(SPECS, current=first.placements)
    assert again.placements == first.placements
    assert diff(first.placements, again) == []


def test_a_running_placement_stays_even_where_a_better_node_is_free():
    on_nas = only(run([ModelSpec(name="llama3.2:3b", placement={"nodes": ["nas"]})]), "llama3.2:3b")
    # the allow-list is gone: gpubox would now be the better node, but the replica runs
    result = run([ModelSpec(name="llama3.2:3b")], current=[on_nas])
    assert result.placements == (on_nas,)
    assert only(result, "llama3.2:3b").gpu_layers == 0
    assert diff([on_nas], result) == []


def test_a_running_placement_keeps_its_gpu_layers_when_vram_frees_up():
    pinned = ModelSpec(name="qwen2.5:14b", pinned=True)  # placed first: takes VRAM
    first = run([pinned, ModelSpec(name="llama3.3:70b")])
    big = only(first, "llama3.3:70b")
    info, vram = LIBRARY["llama3.3:70b"], node("gpubox").vram
    assert only(first, "qwen2.5:14b").node == "gpubox"
    left = vram - only(first, "qwen2.5:14b").vram
    assert big.node == "gpubox"
    assert big.gpu_layers == fit_gpu_layers(info, 4096, left).gpu_layers
    assert big.gpu_layers < fit_gpu_layers(info, 4096, vram).gpu_layers
    result = run([ModelSpec(name="llama3.3:70b")], current=first.placements)
    assert only(result, "llama3.3:70b") == big  # more layers would fit now; no reload for that
    (change,) = diff(first.placements, result)
    assert (change.op, change.placement.model) == ("-", "qwen2.5:14b")


def test_a_placement_moves_when_its_node_goes_down():
    first = run([ModelSpec(name="llama3.2:3b")])
    assert where(first, "llama3.2:3b") == {"gpubox": 1}
    result = run([ModelSpec(name="llama3.2:3b")], homelab(down=["gpubox"]), first.placements)
    assert where(result, "llama3.2:3b") == {"nas": 1}
    changes = diff(first.placements, result)
    assert [(c.op, c.placement.node) for c in changes] == [("-", "gpubox"), ("+", "nas")]


def test_a_placement_moves_when_its_node_is_excluded():
    first = run([ModelSpec(name="llama3.2:3b")])
    spec = ModelSpec(name="llama3.2:3b", placement={"nodes": ["minipc"]})
    result = run([spec], current=first.placements)
    assert where(result, "llama3.2:3b") == {"minipc": 1}
    assert [(c.op, c.placement.node) for c in diff(first.placements, result)] == [
        ("-", "gpubox"),
        ("+", "minipc"),
    ]


def test_a_lost_replica_is_replaced_elsewhere():
    first = run([ModelSpec(name="llama3.2:3b", replicas=2)])
    assert where(first, "llama3.2:3b") == {"gpubox": 1, "nas": 1}
    result = run(
        [ModelSpec(name="llama3.2:3b", replicas=2)], homelab(down=["nas"]), first.placements
    )
    assert where(result, "llama3.2:3b") == {"gpubox": 1, "minipc": 1}
    ops = [(c.op, c.placement.node) for c in diff(first.placements, result)]
    assert ops == [("-", "nas"), ("+", "minipc")]  # the gpubox replica is not touched


def test_a_changed_context_reloads():
    spec = ModelSpec(name="llama3.2:3b", replicas=2, placement={"strategy": "pack"})
    first = run([spec])
    result = run([spec.model_copy(update={"context": 8192})], current=first.placements)
    (change,) = diff(first.placements, result)
    assert (change.op, change.reload) == ("~", True)
    assert (change.before.context, change.after.context) == (4096, 8192)
    assert change.after.node == "gpubox" and change.after.replicas == 2
    # a larger KV cache, on the GPU with the layers
    assert change.after.vram > change.before.vram
    assert change.describe().startswith("~ llama3.2:3b on gpubox: context 4096 -> 8192, ")
    assert f"vram {human_bytes(change.before.vram)} -> {human_bytes(change.after.vram)}" in (
        change.describe()
    )


def test_a_changed_replica_count_does_not_reload():
    pack = {"strategy": "pack"}
    first = run([ModelSpec(name="llama3.2:3b", replicas=2, placement=pack)])
    fewer = run(
        [ModelSpec(name="llama3.2:3b", replicas=1, placement=pack)], current=first.placements
    )
    (change,) = diff(first.placements, fewer)
    assert (change.op, change.reload) == ("~", False)
    assert change.describe() == "~ llama3.2:3b on gpubox: replicas 2 -> 1"
    more = run(
        [ModelSpec(name="llama3.2:3b", replicas=3, placement=pack)], current=first.placements
    )
    (change,) = diff(first.placements, more)
    assert (change.op, change.reload, change.after.replicas) == ("~", False, 3)
    assert change.after.engine == change.before.engine


def test_one_more_replica_than_a_running_placement_has_room_for():
    spec = ModelSpec(name="llama3.1:8b", placement={"nodes": ["nas"]}, llama=SMALL_BATCH)
    first = run([spec])
    result = run([spec.model_copy(update={"replicas": Replicas(min=2)})], current=first.placements)
    assert result.placements == first.placements  # the running replica stays as it is
    (missing,) = result.unplaced
    eight = ram("llama3.1:8b", llama=SMALL_BATCH)
    assert (missing.wanted, missing.placed) == (2, 1)
    assert missing.reason == (
        f"needs {human_bytes(eight)} RAM (context 4096, on the CPU); minipc is excluded by "
        f"placement.nodes; gpubox is excluded by placement.nodes; nas has "
        f"{human_bytes(node('nas').ram - eight)} free, needs {human_bytes(eight)} RAM for one "
        "more replica"
    )


def test_replicas_above_min_that_run_are_kept_up_to_max():
    """Replicas the autoscaler added (min 1, max 3, three running) are not taken away."""
    spec = ModelSpec(
        name="llama3.2:3b", replicas={"min": 1, "max": 3}, placement={"strategy": "pack"}
    )
    running = replace(only(run([spec]), "llama3.2:3b"), replicas=3)
    result = run([spec], current=[running])
    assert result.placements == (running,)
    capped = run([spec.model_copy(update={"replicas": Replicas(min=1, max=2)})], current=[running])
    assert only(capped, "llama3.2:3b").replicas == 2


def test_a_removed_model_is_taken_down():
    first = run([ModelSpec(name="llama3.2:3b"), ModelSpec(name="llama3.2:1b")])
    result = run([ModelSpec(name="llama3.2:1b")], current=first.placements)
    changes = diff(first.placements, result)
    assert [(c.op, c.placement.model) for c in changes] == [("-", "llama3.2:3b")]
    assert not changes[0].reload


# -- notes ---------------------------------------------------------------------------


def test_a_context_above_the_training_context_is_noted():
    result = run([ModelSpec(name="qwen2.5:14b", context=65536)])
    assert result.notes == (
        "qwen2.5:14b: context 65536 is above the 32768 tokens the model was trained on; "
        "answers may degrade past that",
    )
    assert only(result, "qwen2.5:14b").context == 65536  # a note, not a refusal


def test_an_unknown_node_in_placement_nodes_is_noted():
    result = run([ModelSpec(name="llama3.2:1b", placement={"nodes": ["gpubox", "tower"]})])
    assert result.notes == (
        "llama3.2:1b: placement.nodes names tower, which is not in the cluster "
        "(nodes: gpubox, minipc, nas)",
    )
    assert where(result, "llama3.2:1b") == {"gpubox": 1}


def test_an_empty_cluster():
    (missing,) = run([ModelSpec(name="llama3.2:1b")], []).unplaced
    assert (
        missing.reason
        == f"needs {human_bytes(ram('llama3.2:1b'))} RAM (context 4096, on the CPU); "
        "the cluster has no nodes"
    )


# -- describing changes --------------------------------------------------------------


def test_describe_each_kind_of_change():
    cpu = only(run([ModelSpec(name="llama3.2:3b", placement={"nodes": ["nas"]})]), "llama3.2:3b")
    gpu = only(
        run([ModelSpec(name="llama3.2:3b", replicas=2, placement={"strategy": "pack"})]),
        "llama3.2:3b",
    )
    assert Change("+", None, cpu).describe() == (
        "+ llama3.2:3b on nas: 1 replica, context 4096, 4 slots, 4 threads, CPU, "
        f"{human_bytes(ram('llama3.2:3b'))} RAM each"
    )
    assert Change("-", gpu, None).describe() == (
        "- llama3.2:3b on gpubox: 2 replicas, context 4096, 4 slots, 8 threads, 29 GPU layers, "
        f"{human_bytes(gpu.ram)} RAM + {human_bytes(gpu.vram)} VRAM each"
    )
    fewer_layers = replace(gpu, gpu_layers=20, threads=4)
    assert Change("~", gpu, fewer_layers).describe() == (
        "~ llama3.2:3b on gpubox: threads 8 -> 4, gpu layers 29 -> 20"
    )
    assert Change("~", gpu, fewer_layers).reload
    reshaped = replace(gpu, parallel=2, llama=LlamaSettings(kv_cache_type="q8_0"))
    assert Change("~", gpu, reshaped).describe() == (
        "~ llama3.2:3b on gpubox: parallel 4 -> 2, llama.kv_cache_type f16 -> q8_0"
    )
    assert Change("~", gpu, reshaped).reload
    assert not Change("+", None, cpu).reload and not Change("-", gpu, None).reload


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 MiB"),
        (512 * MIB, "512 MiB"),
        (1023 * MIB, "1023 MiB"),
        (GIB, "1.0 GiB"),
        (3 * GIB // 2, "1.5 GiB"),
        (61 * GIB, "61.0 GiB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


# -- the replica's shape: slots and llama.cpp settings -------------------------------


def test_a_placement_reserves_the_memory_of_its_slots_and_settings():
    """The estimate follows the model's parallel and llama settings: a q8_0 cache is
    smaller, more slots add output rows, and the placement carries them to the engine."""
    base = ModelSpec(name="llama3.2:3b", placement={"gpu": "never", "nodes": ["minipc"]})
    lean = ModelSpec.model_validate(
        {**base.model_dump(), "parallel": 1, "llama": {"kv_cache_type": "q8_0"}}
    )
    p, q = only(run([base]), "llama3.2:3b"), only(run([lean]), "llama3.2:3b")
    assert (p.parallel, p.llama) == (DEFAULT_PARALLEL, LlamaSettings())
    assert (q.parallel, q.llama.kv_cache_type) == (1, "q8_0")
    info = LIBRARY["llama3.2:3b"]
    assert q.ram == _estimate_memory(info, 4096, parallel=1, llama=q.llama).ram
    assert q.ram < p.ram


def test_changing_the_slots_or_settings_reloads_the_placement():
    spec = ModelSpec(name="llama3.2:3b", placement={"nodes": ["minipc"]})
    first = run([spec])
    assert run([spec], current=first.placements).placements == first.placements
    for update in ({"parallel": 2}, {"llama": {"flash_attn": "off"}}):
        changed = ModelSpec.model_validate({**spec.model_dump(), **update})
        result = run([changed], current=first.placements)
        (change,) = diff(first.placements, result)
        assert change.op == "~" and change.reload, update


def test_a_placement_read_back_from_json_has_its_settings():
    p = only(run([ModelSpec(name="llama3.2:3b", llama={"ubatch": 128})]), "llama3.2:3b")
    again = Placement(**json.loads(json.dumps(asdict(p))))
    assert again == p and again.llama.ubatch == 128


def test_a_fake_model_has_one_slot_unless_told():
    fake = only(run([ModelSpec(name="llama3.2:1b", engine="fake")]), "llama3.2:1b")
    assert fake.parallel == 1
    four = ModelSpec(name="llama3.2:1b", engine="fake", parallel=4)
    assert only(run([four]), "llama3.2:1b").parallel == 4


# -- splitting a model over nodes ------------------------------------------------------


def small_boxes(*gib: float) -> list[PlanNode]:
    """CPU-only nodes a, b, c ... with ``gib`` GiB each."""
    return [
        PlanNode(name=chr(ord("a") + i), up=True, ram=int(g * GIB), cores=4)
        for i, g in enumerate(gib)
    ]


def check_split(p: Placement, nodes: Sequence[PlanNode]) -> None:
    """Every layer is somewhere once, and each node's share fits what it has (in RAM)."""
    info = LIBRARY[p.model]
    assert p.replicas == 1 and p.gpu_layers == 0 and p.vram == 0
    assert all(part.vram == 0 for part in p.parts)
    assert p.held + sum(part.layers for part in p.parts) == info.n_layers + 1
    free = {n.name: n.ram for n in nodes}
    assert p.ram <= free[p.node]
    for part in p.parts:
        assert part.layers >= 1 and part.ram <= free[part.node]

    # the main replica's memory: the whole model on the CPU without the parts' blocks
    # (their weights and KV cache) and without a prompt cache; it keeps the output layer
    def last(g: int) -> int:  # weights and KV of the last g layers (the output is last)
        est = estimate_memory(info, 4096, gpu_layers=g)
        return est.weights_vram + est.kv_vram

    remote = sum(part.layers for part in p.parts)
    whole = estimate_memory(info, 4096)
    expected = whole.ram - whole.cache_ram - (last(remote + 1) - last(1)) + info.tied_head_bytes
    assert p.ram == expected


def test_a_model_no_node_holds_is_split_over_the_fewest_nodes_that_do():
    nodes = small_boxes(4.0, 3.0, 3.0)  # llama3.1:8b needs about 5.5 GiB on one CPU
    result = run([ModelSpec(name="llama3.1:8b")], nodes)
    assert result.unplaced == ()
    p = only(result, "llama3.1:8b")
    assert (p.node, [part.node for part in p.parts]) == ("a", ["b"])  # two nodes are enough
    check_split(p, nodes)
    # layers in proportion to what each has left: a (4 GiB) takes more than b (3 GiB)
    assert p.held > p.parts[0].layers
    assert p.reason == (
        f"split: no node holds it whole; layers a {p.held} + b {p.parts[0].layers} (of 33)"
    )
    (change,) = diff([], result)
    assert change.describe() == (
        f"+ llama3.1:8b on a: split: a {p.held} layers ({human_bytes(p.ram)} RAM) + "
        f"b {p.parts[0].layers} layers ({human_bytes(p.parts[0].ram)} RAM), context 4096, "
        f"{DEFAULT_PARALLEL} slots, 4 threads"
    )


def test_a_split_takes_a_third_node_when_two_are_not_enough():
    nodes = small_boxes(2.5, 2.5, 2.5, 2.5)
    p = only(run([ModelSpec(name="llama3.1:8b")], nodes), "llama3.1:8b")
    assert len(p.parts) == 2
    check_split(p, nodes)


def test_a_model_that_fits_split_nowhere_says_how_much_is_missing():
    result = run([ModelSpec(name="llama3.3:70b")], small_boxes(4.0, 3.0, 3.0))
    (missing,) = result.unplaced
    assert missing.reason.startswith(f"needs {human_bytes(ram('llama3.3:70b'))} RAM")
    assert "; split over the 3 nodes it may use, it needs about " in missing.reason
    assert "and they have 10.0 GiB free (" in missing.reason
    assert missing.reason.endswith(" missing)")


def test_split_never_and_gpu_required_do_not_split():
    nodes = small_boxes(4.0, 3.0)
    never = ModelSpec(name="llama3.1:8b", placement={"split": "never"})
    (missing,) = run([never], nodes).unplaced
    assert missing.reason == (
        f"needs {human_bytes(ram('llama3.1:8b'))} RAM (context 4096, on the CPU); "
        "a has 4.0 GiB free; b has 3.0 GiB free"
    )
    required = ModelSpec(name="llama3.1:8b", placement={"gpu": "required"})
    assert run([required], nodes).placements == ()


def test_a_split_model_runs_one_replica():
    spec = ModelSpec(name="llama3.1:8b", replicas=Replicas(min=1, max=3))
    nodes = small_boxes(4.0, 3.0, 3.0)
    first = run([spec], nodes)
    assert where(first, "llama3.1:8b") == {"a": 1}
    two = ModelSpec(name="llama3.1:8b", replicas=Replicas(min=2))
    (missing,) = run([two], nodes).unplaced
    assert (missing.placed, missing.reason) == (1, "a split model runs one replica")


def test_a_running_split_stays_and_a_lost_part_is_split_again():
    nodes = small_boxes(4.0, 3.0, 3.0)
    spec = ModelSpec(name="llama3.1:8b")
    p = only(run([spec], nodes), "llama3.1:8b")
    assert diff([p], run([spec], nodes, current=[p])) == []  # kept as it runs
    down = [replace(n, up=False) if n.name == "b" else n for n in nodes]
    again = only(run([spec], down, current=[p]), "llama3.1:8b")
    assert (again.node, [part.node for part in again.parts]) == ("a", ["c"])
    (change,) = diff([p], run([spec], down, current=[p]))
    assert change.op == "~" and change.reload
    assert "split a " in change.describe() and "b " in change.describe()


def test_a_split_placement_survives_json():
    p = only(run([ModelSpec(name="llama3.1:8b")], small_boxes(4.0, 3.0)), "llama3.1:8b")
    again = Placement(**json.loads(json.dumps(asdict(p))))
    assert again == p and again.engine == p.engine and again.parts == p.parts


# -- GPU memory first ---------------------------------------------------------------------


def gpu_box(name: str, ram_gib: float, vram_gib: float) -> PlanNode:
    return PlanNode(name=name, up=True, ram=int(ram_gib * GIB), vram=int(vram_gib * GIB),
                    gpus=1, cores=4)  # fmt: skip


def check_layers(p: Placement) -> None:
    """Every layer is somewhere once, every part holds a block."""
    assert p.held + sum(part.layers for part in p.parts) == LIBRARY[p.model].n_layers + 1
    assert all(part.layers >= 1 for part in p.parts)


def check_room(p: Placement, nodes: Sequence[PlanNode]) -> None:
    """What each node of ``p`` holds fits what it has, in RAM and in VRAM."""
    ram, vram = {n.name: n.ram for n in nodes}, {n.name: n.vram for n in nodes}
    assert p.ram <= ram[p.node] and p.vram <= vram[p.node]
    for part in p.parts:
        assert part.ram <= ram[part.node] and part.vram <= vram[part.node]


def test_a_split_lends_a_gpu_node_its_vram_first():
    # no node holds llama3.1:8b whole (about 5.5 GiB): gpubox has 1 GiB RAM + 3 GiB VRAM
    nodes = [gpu_box("gpubox", 1.0, 3.0), *small_boxes(3.5, 3.0)]
    p = only(run([ModelSpec(name="llama3.1:8b")], nodes), "llama3.1:8b")
    check_layers(p)
    check_room(p, nodes)
    assert (p.node, [q.node for q in p.parts]) == ("a", ["gpubox"])  # main: the most RAM
    assert p.gpu_layers == 0 and p.vram == 0  # the main replica's blocks in its RAM
    [gpu] = p.parts
    assert gpu.ram == RPC_OVERHEAD and gpu.vram > 2 * GIB  # its blocks in VRAM
    info = LIBRARY["llama3.1:8b"]
    assert p.reason == (
        f"split: no node holds it whole; layers a {p.held} + gpubox {gpu.layers} (VRAM) "
        f"(of {info.n_layers + 1})"
    )
    assert describe_placement(p).startswith(
        f"split: a {p.held} layers ({human_bytes(p.ram)} RAM) + gpubox {gpu.layers} layers "
        f"({human_bytes(gpu.vram)} VRAM), "
    )
    # Ray holds the VRAM: a second model finds gpubox's VRAM taken
    again = Placement(**json.loads(json.dumps(asdict(p))))
    assert again == p and again.parts[0].vram == gpu.vram


def test_a_split_falls_back_to_ram_when_vram_is_too_small():
    # gpubox's 0.5 GiB of VRAM and a's RAM do not hold it; both nodes' RAM does
    nodes = [gpu_box("gpubox", 3.0, 0.5), *small_boxes(3.5)]
    p = only(run([ModelSpec(name="llama3.1:8b")], nodes), "llama3.1:8b")
    check_split(p, nodes)
    assert {p.node, *(q.node for q in p.parts)} == {"a", "gpubox"}


def test_gpu_never_splits_over_ram_only():
    nodes = [gpu_box("gpubox", 1.0, 3.0), *small_boxes(3.5, 3.0)]
    spec = ModelSpec(name="llama3.1:8b", placement={"gpu": "never"})
    p = only(run([spec], nodes), "llama3.1:8b")
    check_split(p, nodes)
    assert "gpubox" not in p.nodes  # its 1 GiB of RAM is too little to be worth a part


def test_a_main_replica_on_a_gpu_node_puts_its_own_blocks_on_its_gpu():
    nodes = [gpu_box("g1", 1.5, 3.0), gpu_box("g2", 1.0, 3.0)]
    p = only(run([ModelSpec(name="llama3.1:8b")], nodes), "llama3.1:8b")
    check_layers(p)
    check_room(p, nodes)
    assert (p.node, [q.node for q in p.parts]) == ("g1", ["g2"])  # the most RAM
    assert p.gpu_layers == p.held - 1 >= 1  # its blocks on its GPU, the output in RAM
    assert p.vram > GIB and p.parts[0].vram > GIB and p.parts[0].ram == RPC_OVERHEAD
    assert p.reason.startswith(
        f"split: no node holds it whole; layers g1 {p.held} (VRAM) + g2 {p.parts[0].layers} (VRAM)"
    )
