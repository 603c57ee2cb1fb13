"""The cluster view on the simulated homelab: API, CLI, nodes joining and dying."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nodes.agent import NodeSettings, plan_offer
from nodes.hardware import load_inventory
from tests.conftest import HOMELAB, NODE_FIXTURES, simulated_node

CORRAL = str(Path(sys.executable).with_name("corral"))
GIB = 1024**3


def api_nodes(corral) -> list[dict]:
    r = httpx.get(f"{corral.url}/api/cluster/nodes", timeout=10)
    assert r.status_code == 200
    return r.json()["nodes"]


def wait_for_nodes(corral, predicate, timeout: float, what: str) -> tuple[list[dict], float]:
    """Poll the API until ``predicate(nodes)``; the nodes and how long it took."""
    started = time.monotonic()
    while True:
        nodes = api_nodes(corral)
        if predicate(nodes):
            return nodes, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}; last view: {nodes}")
        time.sleep(0.25)


def by_name(nodes: list[dict]) -> dict[str, dict]:
    return {n["name"]: n for n in nodes}


def all_probed(nodes: list[dict]) -> bool:
    # Other tests add boxes to the session's cluster and remove them: those stay listed, down.
    homelab = [n for n in nodes if n["name"] in {"minipc", "gpubox", "nas"}]
    return len(homelab) == 3 and all(n["state"] == "up" and n["cpu_cores"] for n in homelab)


@pytest.mark.parametrize(("fixture", "role"), HOMELAB)
def test_api_shows_each_box_with_its_hardware_and_offer(corral, fixture, role):
    nodes, _ = wait_for_nodes(corral, all_probed, 30, "every homelab node probed")
    inventory = load_inventory(NODE_FIXTURES / f"{fixture}.yaml")
    offer = plan_offer(inventory, NodeSettings(), role)
    node = by_name(nodes)[inventory.hostname]
    assert (node["role"], node["state"]) == (role, "up")
    assert node["cpu_model"] == inventory.cpu_model and node["cpu_cores"] == inventory.cpu_cores
    assert node["ram_total"] == inventory.ram_total
    assert node["ram_used"] == inventory.ram_total - inventory.ram_available
    assert node["ram_offered"] == offer.memory
    assert node["vram_offered_mib"] == offer.vram_mib
    assert [g["name"] for g in node["gpus"]] == [g.name for g in inventory.gpus]
    assert [g["vram_total"] for g in node["gpus"]] == [g.vram_total for g in inventory.gpus]


def test_the_head_is_listed_first(corral):
    nodes, _ = wait_for_nodes(corral, all_probed, 30, "every homelab node probed")
    assert nodes[0]["name"] == "minipc" and nodes[0]["role"] == "head"


def test_a_loaded_model_shows_on_the_node_it_runs_on(corral, openai_client):
    openai_client.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    nodes, _ = wait_for_nodes(
        corral,
        lambda ns: any("smollm2:135m" in n["models"] for n in ns),
        15,
        "the model's node to list it",
    )
    assert sum("smollm2:135m" in n["models"] for n in nodes) == 1


def test_corral_nodes_lists_the_cluster(corral, homelab):
    wait_for_nodes(corral, all_probed, 30, "every homelab node probed")
    args = [CORRAL, "nodes", "--address", homelab.address, "--state-dir", str(homelab.state_dir)]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {n["name"]: n for n in json.loads(out.stdout)}
    assert set(rows) == {"minipc", "gpubox", "nas"}
    assert rows["gpubox"]["vram_offered_mib"] == 24064
    table = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    for expected in ("minipc", "gpubox", "nas", "NVIDIA GeForce RTX 3090", "64.0 GiB", "up"):
        assert expected in table.stdout, table.stdout


def test_a_box_that_joins_appears_and_one_that_dies_shows_down_within_10_s(corral, homelab):
    wait_for_nodes(corral, all_probed, 30, "every homelab node probed")
    laptop = homelab.cluster.add_node(**simulated_node("laptop-i5-8250u-ram8g", "worker"))
    try:
        nodes, joined_after = wait_for_nodes(
            corral, lambda ns: "laptop" in by_name(ns), 10, "the laptop to appear"
        )
        assert by_name(nodes)["laptop"]["state"] == "up"
        wait_for_nodes(
            corral,
            lambda ns: by_name(ns).get("laptop", {}).get("cpu_cores") == 4,
            30,
            "the laptop's first probe",
        )
    finally:
        homelab.cluster.remove_node(laptop, allow_graceful=False)  # unplugged, not shut down
    nodes, down_after = wait_for_nodes(
        corral,
        lambda ns: by_name(ns).get("laptop", {}).get("state") == "down",
        10,
        "the laptop to show as down",
    )
    print(f"laptop appeared after {joined_after:.1f} s, shown down after {down_after:.1f} s")
    assert by_name(nodes)["laptop"]["note"]
    assert all(by_name(nodes)[n]["state"] == "up" for n in ("minipc", "gpubox", "nas"))
