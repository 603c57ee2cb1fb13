"""The cluster view as a pure function of GCS's node list, probes and the time."""

from __future__ import annotations

from pathlib import Path

from cluster.inventory import ProbeResult, RayNode, merge, node_state
from nodes.hardware import load_inventory

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"
GIB = 1024**3
NOW = 1_000.0


def ray_node(node_id: str, name: str, role: str = "worker", alive: bool = True, **resources):
    labels = {"corral.node": name, "corral.role": role}
    return RayNode(node_id, alive, "10.0.0.1", labels, {"CPU": 1.0, **resources})


def probe(fixture: str, at: float = NOW - 1) -> ProbeResult:
    return ProbeResult(load_inventory(FIXTURES / f"{fixture}.yaml"), at)


def test_live_nodes_with_fresh_probes_are_up_with_their_hardware():
    nodes = [
        ray_node("a", "gpubox", memory=61 * GIB, vram_mib=24064, GPU=1),
        ray_node("b", "minipc", role="head", memory=13 * GIB),
    ]
    probes = {"a": probe("gpu-rtx3090-24g-ram64g"), "b": probe("minipc-n100-ram16g")}
    rows = merge(nodes, probes, {}, {"a": ["llama3:8b"]}, NOW, stale_after=8)
    assert [r.name for r in rows] == ["minipc", "gpubox"]  # the head first
    head, gpu = rows
    assert head.state == gpu.state == "up"
    assert (gpu.cpu_cores, gpu.ram_total, gpu.ram_used) == (8, 64 * GIB, 6 * GIB)
    assert gpu.gpus[0].name == "NVIDIA GeForce RTX 3090"
    assert gpu.gpus[0].vram_used == 24 * GIB - int(23.4 * GIB)
    assert (gpu.ram_offered, gpu.vram_offered_mib, gpu.models) == (61 * GIB, 24064, ["llama3:8b"])
    assert head.models == [] and head.checked_at == NOW - 1


def test_a_dead_node_is_down_and_a_rejoined_box_shows_once():
    nodes = [
        ray_node("old-nas", "nas", alive=False),
        ray_node("new-nas", "nas"),
        ray_node("gone", "laptop", alive=False),
    ]
    rows = merge(nodes, {"new-nas": probe("nas-ram8g")}, {}, {}, NOW, stale_after=8)
    assert [(r.name, r.node_id, r.state) for r in rows] == [
        ("laptop", "gone", "down"),
        ("nas", "new-nas", "up"),
    ]
    assert "left the cluster" in rows[0].note


def test_a_node_whose_probe_stopped_answering_is_down():
    rows = merge(
        [ray_node("a", "nas")], {"a": probe("nas-ram8g", at=NOW - 30)}, {}, {}, NOW, stale_after=8
    )
    assert rows[0].state == "down" and rows[0].note == "no answer for 30 s"
    assert rows[0].ram_total == 8 * GIB  # the last known hardware is still shown


def test_a_node_that_just_joined_is_up_before_its_first_probe_answers():
    first_seen = {"a": NOW - 2}
    rows = merge([ray_node("a", "laptop")], {}, first_seen, {}, NOW, stale_after=8)
    assert rows[0].state == "up" and rows[0].ram_total is None
    late = merge([ray_node("a", "laptop")], {}, {"a": NOW - 20}, {}, NOW, stale_after=8)
    assert late[0].state == "down"


def test_node_state():
    assert node_state(True, 1.0, 8.0) == ("up", None)
    assert node_state(True, 9.4, 8.0) == ("down", "no answer for 9 s")
    assert node_state(False, 0.0, 8.0)[0] == "down"
