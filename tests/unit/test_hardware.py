"""The hardware probe: this real machine, NVML through a fake, declared inventories."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from nodes.hardware import (
    INVENTORY_FILE_ENV,
    InventoryFileError,
    current_inventory,
    load_inventory,
    probe,
)
from tests.support.fake_nvml import (
    FakeGpu,
    FakeNvml,
    NVMLError,
    NVMLError_LibraryNotFound,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"
GIB = 1024**3


def test_probe_of_this_machine():
    inv = probe()
    assert inv.hostname and inv.os and inv.cpu_model
    assert inv.cpu_cores >= 1 and inv.cpu_threads >= inv.cpu_cores
    assert inv.ram_total == psutil.virtual_memory().total
    assert 0 < inv.ram_available <= inv.ram_total
    assert not inv.declared


def test_no_nvidia_driver_is_no_gpu_and_a_reason_not_an_error():
    inv = probe(nvml=FakeNvml(fail_init=NVMLError_LibraryNotFound()))
    assert inv.gpus == [] and inv.vram_total == 0
    assert inv.gpu_note == "no NVIDIA driver (NVML Shared Library Not Found)"


def test_gpus_are_read_through_nvml():
    nvml = FakeNvml(
        gpus=[
            FakeGpu("NVIDIA GeForce RTX 3090", "GPU-aaa", 24 * GIB, 23 * GIB),
            FakeGpu("Tesla P40", "GPU-bbb", 24 * GIB, 24 * GIB, capability=None),
        ]
    )
    inv = probe(nvml=nvml)
    first, second = inv.gpus
    assert (first.name, first.uuid, first.compute_capability, first.driver) == (
        "NVIDIA GeForce RTX 3090",
        "GPU-aaa",
        "8.6",
        "550.120",
    )
    assert (first.vram_total, first.vram_free) == (24 * GIB, 23 * GIB)
    assert second.compute_capability is None  # not supported by this GPU: left out
    assert inv.vram_total == 48 * GIB and inv.vram_free == 47 * GIB
    assert inv.gpu_note is None and nvml.shutdowns == 1


def test_an_nvml_failure_after_init_is_no_gpu_and_nvml_is_shut_down():
    nvml = FakeNvml(fail_count=NVMLError("GPU is lost"))
    inv = probe(nvml=nvml)
    assert inv.gpus == [] and inv.gpu_note == "NVML failed: GPU is lost"
    assert nvml.shutdowns == 1


def test_a_driver_without_gpus():
    inv = probe(nvml=FakeNvml())
    assert inv.gpus == [] and inv.gpu_note == "the NVIDIA driver reports no GPU"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_fixture_inventories_load(path):
    inv = load_inventory(path)
    assert inv.declared and inv.ram_available <= inv.ram_total
    # The file name says what the hardware is.
    assert f"ram{inv.ram_total // GIB}g" in path.stem
    if inv.gpus:
        assert f"{inv.vram_total // GIB}g" in path.stem


def test_declared_inventory_wins_over_the_probe(monkeypatch):
    monkeypatch.setenv(INVENTORY_FILE_ENV, str(FIXTURES / "nas-ram8g.yaml"))
    assert current_inventory().hostname == "nas"
    monkeypatch.delenv(INVENTORY_FILE_ENV)
    assert not current_inventory().declared


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "an inventory is a mapping"),
        ("hostname: x\n", "os: Field required"),
        ("hostname: [\n", "cannot read the inventory"),
        (
            (FIXTURES / "nas-ram8g.yaml").read_text().replace("8GiB", "lots"),
            "ram_total: could not parse value and unit from byte string",
        ),
    ],
)
def test_broken_inventory_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "box.yaml"
    path.write_text(text)
    with pytest.raises(InventoryFileError, match=message):
        load_inventory(path)
