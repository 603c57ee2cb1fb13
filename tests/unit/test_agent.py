"""Joining a box: the offer, the exact ``ray start`` command, the pre-flight checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.agent import (
    NodeRecord,
    NodeSettings,
    NodeStartError,
    check_can_join,
    check_name,
    check_reachable,
    check_temp_dir,
    plan_node,
    plan_offer,
    ray_start_command,
    slug,
    stop_node,
)
from nodes.cpu_kernels import BuildFeatures, ProbeOutcome, decide
from nodes.hardware import load_inventory

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"
GIB, MIB = 1024**3, 1024**2


def inventory(name: str):
    return load_inventory(FIXTURES / f"{name}.yaml")


def test_offer_is_what_the_box_has_minus_reserves():
    offer = plan_offer(inventory("gpu-rtx3090-24g-ram64g"), NodeSettings(), "worker")
    # 64 GiB - 2 GiB reserve - 1 GiB object store; 24 GiB - 512 MiB on the one GPU.
    assert offer.memory == 61 * GIB
    assert offer.object_store_memory == 1 * GIB
    assert (offer.num_gpus, offer.vram_mib) == (1, 24 * 1024 - 512)
    assert offer.labels == {
        "corral.node": "gpubox",
        "corral.gpu": "nvidia-geforce-rtx-3090",
        "corral.role": "worker",
    }


def test_reserves_and_caps_are_configurable():
    settings = NodeSettings(
        name="big", reserve_ram="8GiB", reserve_vram="2GiB", max_ram="32GiB", max_vram="16GiB"
    )
    offer = plan_offer(inventory("gpu-rtx3090-24g-ram64g"), settings, "head")
    assert offer.memory == 32 * GIB  # capped: 64 - 8 - 1 = 55 would be more
    assert offer.vram_mib == 16 * 1024  # capped: 24 - 2 = 22 would be more
    assert offer.name == "big" and offer.role == "head"
    small = plan_offer(inventory("nas-ram8g"), NodeSettings(reserve_ram="1GiB"), "worker")
    # 8 GiB - 1 GiB - the object store (5% of RAM: 409.6 MiB)
    assert small.memory == 8 * GIB - 1 * GIB - int(8 * GIB // 20)
    assert (small.num_gpus, small.vram_mib, small.gpu) == (0, 0, "none")


def test_a_reserve_larger_than_the_box_is_refused():
    with pytest.raises(NodeStartError, match="lower --reserve-ram"):
        plan_offer(inventory("nas-ram8g"), NodeSettings(reserve_ram="8GiB"), "worker")


def test_head_command():
    offer = plan_offer(inventory("minipc-n100-ram16g"), NodeSettings(), "head")
    cmd = ray_start_command(offer, NodeSettings(), address=None)
    assert cmd[:3] == ["ray", "start", "--head"]
    assert "--port=6379" in cmd and "--dashboard-host=127.0.0.1" in cmd
    assert f"--memory={offer.memory}" in cmd and "--num-gpus=0" in cmd
    assert not any(a.startswith("--resources") for a in cmd)  # no VRAM: no vram_mib resource
    assert "--labels=corral.node=minipc,corral.gpu=none,corral.role=head" in cmd
    config = next(a for a in cmd if a.startswith("--system-config="))
    assert json.loads(config.split("=", 1)[1])["health_check_period_ms"] == 1000
    assert cmd[-1] == "--block"


def test_the_cpu_kernels_become_a_label():
    offer = plan_offer(inventory("minipc-n100-ram16g"), NodeSettings(), "head", "amx-repack")
    assert offer.labels["corral.cpu_kernels"] == "amx-repack"
    cmd = ray_start_command(offer, NodeSettings(), address=None)
    assert (
        "--labels=corral.node=minipc,corral.gpu=none,corral.role=head,"
        "corral.cpu_kernels=amx-repack" in cmd
    )


@pytest.mark.parametrize("outcome", [ProbeOutcome(True, "ok"), ProbeOutcome(False, "crashed: X")])
@pytest.mark.parametrize("amx", [True, False])
def test_every_cpu_kernels_slug_is_a_valid_label_value(outcome, amx):
    build = BuildFeatures(amx_int8=amx, avx512_vnni=amx, repack=True)
    for override in ("auto", "on", "off"):
        kernels = decide(build, amx, override, outcome)
        assert check_name(kernels.slug) == kernels.slug  # Ray's label value rules


def test_plan_node_labels_the_box_with_its_cpu_kernels(tmp_path):
    fixture = FIXTURES / "gpu-rtx3090-24g-ram64g.yaml"
    kernels = decide(BuildFeatures(repack=True), True, "auto", ProbeOutcome(True, "ok"))
    plan = plan_node(
        NodeSettings(inventory_file=fixture),
        address="10.0.0.2:6379",
        token=tmp_path / "ray-token",
        kernels=kernels,
    )
    assert plan.kernels is kernels
    assert plan.offer.labels["corral.cpu_kernels"] == "repack"
    assert any(a.endswith(",corral.cpu_kernels=repack") for a in plan.command)


def test_worker_command_with_a_gpu_and_custom_ports():
    settings = NodeSettings(node_ip="10.0.0.7", agent_port=52400, temp_dir=Path("/srv/ray"))
    offer = plan_offer(inventory("gpu-rtx3090-24g-ram64g"), settings, "worker")
    cmd = ray_start_command(offer, settings, address="10.0.0.2:6379", ray="/opt/corral/bin/ray")
    assert cmd[:3] == ["/opt/corral/bin/ray", "start", "--address=10.0.0.2:6379"]
    assert "--head" not in cmd and not any(a.startswith("--port") for a in cmd)
    assert "--num-gpus=1" in cmd and '--resources={"vram_mib": 24064}' in cmd
    assert "--node-ip-address=10.0.0.7" in cmd and "--temp-dir=/srv/ray" in cmd
    assert "--dashboard-agent-listen-port=52400" in cmd


def test_rays_ports_are_pinned_only_when_set():
    offer = plan_offer(inventory("nas-ram8g"), NodeSettings(), "worker")
    unpinned = ray_start_command(offer, NodeSettings(), address="10.0.0.2:6379")
    pinned_options = (
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--min-worker-port",
        "--max-worker-port",
    )
    assert not [a for a in unpinned if a.startswith(pinned_options)]  # Ray picks them
    settings = NodeSettings(
        node_manager_port=6380,
        object_manager_port=6381,
        metrics_export_port=52368,
        dashboard_agent_grpc_port=52366,
        runtime_env_agent_port=52367,
        min_worker_port=10002,
        max_worker_port=10999,
    )
    for address in (None, "10.0.0.2:6379"):  # the head and a worker alike
        cmd = ray_start_command(offer, settings, address=address)
        assert [a for a in cmd if a.startswith(pinned_options)] == [
            "--node-manager-port=6380",
            "--object-manager-port=6381",
            "--metrics-export-port=52368",
            "--dashboard-agent-grpc-port=52366",
            "--runtime-env-agent-port=52367",
            "--min-worker-port=10002",
            "--max-worker-port=10999",
        ]
        assert cmd[-1] == "--block"


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ({"min_worker_port": 10002}, "set min_worker_port and max_worker_port together"),
        ({"max_worker_port": 19999}, "set min_worker_port and max_worker_port together"),
        ({"min_worker_port": 12000, "max_worker_port": 11000}, "12000 is above max_worker_port"),
    ],
)
def test_half_a_worker_port_range_is_refused(ports, message):
    with pytest.raises(ValueError, match=message):
        NodeSettings(**ports)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("NVIDIA GeForce RTX 3090", "nvidia-geforce-rtx-3090"),
        ("Tesla P40 (24GB)", "tesla-p40-24gb"),
    ],
)
def test_gpu_names_become_label_values(text, label):
    assert slug(text) == label


@pytest.mark.parametrize("name", ["gpu box", "-nas", "x" * 64, "nas/2"])
def test_bad_node_names_are_refused(name):
    with pytest.raises(NodeStartError, match="--name"):
        check_name(name)


def test_a_temp_dir_too_long_for_rays_sockets_is_refused():
    check_temp_dir(Path("/tmp/ray-test"))
    with pytest.raises(NodeStartError, match="too long for Ray's socket files"):
        check_temp_dir(Path("/tmp/pytest-of-root/pytest-36/test_a_head_and_a_worker_0/ray"))


def test_an_unreachable_head_is_a_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(NodeStartError) as err:
            check_reachable(f"127.0.0.1:{port}", timeout=1)
    assert "cannot reach the head" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NodeStartError, match="HEAD_HOST:PORT"):
        check_reachable("no-port-here")


def test_joining_without_the_token_file_says_where_it_goes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(NodeStartError, match="no cluster token at .*ray-token"):
            check_can_join(f"127.0.0.1:{s.getsockname()[1]}", tmp_path / "ray-token", "nas")


def test_node_record_round_trip_and_stale_records(tmp_path):
    record = NodeRecord("nas", "worker", "10.0.0.2:6379", pid=os.getpid())
    record.write(tmp_path)
    assert NodeRecord.read(tmp_path) == record
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    NodeRecord("nas", "worker", "10.0.0.2:6379", pid=int(dead.stdout)).write(tmp_path)
    assert NodeRecord.read(tmp_path) is None  # its process is gone
    assert not (tmp_path / "node.json").exists()


def test_stop_without_a_node_and_stop_of_a_node_process(tmp_path):
    assert stop_node(tmp_path) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    NodeRecord("nas", "worker", "10.0.0.2:6379", pid=sleeper.pid).write(tmp_path)
    stopped = stop_node(tmp_path)
    assert stopped is not None and stopped.name == "nas"
    assert sleeper.wait(timeout=10) is not None
    assert NodeRecord.read(tmp_path) is None


def test_stop_refuses_a_state_dir_that_belongs_to_corral_serve(tmp_path):
    NodeRecord("vm", "head", "127.0.0.1:6379", pid=os.getpid(), kind="serve").write(tmp_path)
    with pytest.raises(NodeStartError, match="corral serve"):
        stop_node(tmp_path)
