"""Which devices a split uses: what a worker serves, and each device's share of layers
(``nodes.rpc.served_devices``, ``nodes.rpc.tensor_split``), on made-up device lists.
The CPU case runs for real in tests/integration/test_rpc.py; a box with GPUs is not
available to the suite."""

from __future__ import annotations

import pytest

from nodes import rpc
from nodes.rpc import DEVICE_CPU, DEVICE_GPU, RpcUnavailable, served_devices, tensor_split

CPU = (1, "CPU", "Intel Xeon", DEVICE_CPU)
GPU0 = (2, "CUDA0", "NVIDIA RTX 3090", DEVICE_GPU)
GPU1 = (3, "CUDA1", "NVIDIA RTX 3090", DEVICE_GPU)
REMOTE = (4, "RPC0", "10.0.0.7:50052", DEVICE_GPU)  # another worker, registered here


def test_a_worker_lending_ram_serves_its_cpu_only():
    assert served_devices([CPU, GPU0], gpus=False) == [1]


def test_a_worker_lending_vram_serves_every_gpu_of_its_box_and_no_remote_one():
    assert served_devices([CPU, GPU0, GPU1, REMOTE], gpus=True) == [2, 3]


def test_a_worker_asked_for_gpus_on_a_box_without_any_says_so():
    with pytest.raises(RpcUnavailable, match="no GPU device to serve"):
        served_devices([CPU], gpus=True)


def test_each_worker_gets_its_blocks_and_the_last_one_the_output_layer():
    # 12 blocks here (not offloaded), 10 on a, 8 on b; the output layer is counted last
    assert tensor_split([10, 8], [1, 1], own=0, local=0) == [10, 9]


def test_a_worker_with_two_gpus_spreads_its_blocks_over_both():
    assert tensor_split([10, 8], [2, 1], own=0, local=0) == [5, 5, 9]


def test_this_boxs_gpus_come_last_and_take_the_output_layers_place():
    assert tensor_split([10], [1], own=12, local=2) == [10, 6, 7]


def test_gpus_here_that_hold_nothing_get_no_share():
    assert tensor_split([10, 8], [1, 1], own=0, local=1) == [10, 9, 0]


def test_offload_devices_groups_a_workers_devices(monkeypatch):
    devices = [CPU, GPU0, (5, "RPC0", "h:1", DEVICE_GPU), (6, "RPC1", "h:1", DEVICE_GPU),
               (7, "RPC2", "h:2", DEVICE_CPU)]  # fmt: skip
    monkeypatch.setattr(rpc, "_devices", lambda: devices)
    assert rpc.offload_devices(["h:2", "h:1"]) == ([[7], [5, 6]], [2])
    with pytest.raises(rpc.RpcUnreachable, match="h:3 is not registered"):
        rpc.offload_devices(["h:3"])
