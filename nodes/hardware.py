"""What one box has: CPU, RAM and NVIDIA GPUs, probed with psutil and NVML.

A box without an NVIDIA GPU or driver is the normal case: ``probe`` then
reports no GPUs and says why in ``gpu_note``. A box may also *declare* its
hardware in a YAML file (``CORRAL_INVENTORY_FILE``), for GPUs NVML cannot see
and for simulated nodes in tests; ``current_inventory`` prefers the file.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, ValidationError

INVENTORY_FILE_ENV = "CORRAL_INVENTORY_FILE"


class GpuInfo(BaseModel):
    """One GPU as NVML reports it."""

    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    uuid: str
    vram_total: ByteSize
    vram_free: ByteSize
    compute_capability: str | None = None  # "8.6"
    driver: str | None = None  # "550.54.14"


class NodeInventory(BaseModel):
    """Everything Corral needs to know about a box's hardware, at one moment."""

    model_config = ConfigDict(extra="forbid")

    hostname: str
    os: str
    cpu_model: str
    cpu_cores: int  # physical
    cpu_threads: int  # logical
    ram_total: ByteSize
    ram_available: ByteSize
    gpus: list[GpuInfo] = []
    gpu_note: str | None = None  # why there are no GPUs, when there are none
    declared: bool = False  # read from a file instead of probed
    load_avg: float | None = None  # the box's 1-minute load average, when probed

    @property
    def vram_total(self) -> int:
        return sum(g.vram_total for g in self.gpus)

    @property
    def vram_free(self) -> int:
        return sum(g.vram_free for g in self.gpus)


class InventoryFileError(Exception):
    """A declared-hardware file that cannot be used; the message says why."""


def probe(nvml: ModuleType | Any | None = None) -> NodeInventory:
    """Probe this box. ``nvml`` replaces the ``pynvml`` module (tests pass a fake)."""
    memory = psutil.virtual_memory()
    gpus, note = probe_gpus(nvml)
    return NodeInventory(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
        cpu_model=cpu_model(),
        cpu_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        cpu_threads=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_total=memory.total,
        ram_available=memory.available,
        gpus=gpus,
        gpu_note=note,
        load_avg=load_average(),
    )


def probe_gpus(nvml: ModuleType | Any | None = None) -> tuple[list[GpuInfo], str | None]:
    """NVIDIA GPUs through NVML, or none and the reason (no package, no driver, ...)."""
    if nvml is None:
        try:
            import pynvml as nvml  # package nvidia-ml-py
        except ImportError:
            return [], "nvidia-ml-py is not installed"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return [], f"no NVIDIA driver ({_nvml_text(exc)})"
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = [_gpu(nvml, i, driver) for i in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as exc:
        return [], f"NVML failed: {_nvml_text(exc)}"
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    return gpus, None if gpus else "the NVIDIA driver reports no GPU"


def _gpu(nvml: Any, index: int, driver: str) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability: str | None = f"{major}.{minor}"
    except nvml.NVMLError:  # old drivers and some virtual GPUs do not say
        capability = None
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        vram_total=memory.total,
        vram_free=memory.free,
        compute_capability=capability,
        driver=driver,
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_text(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def cpu_model() -> str:
    """The CPU's marketing name, e.g. "Intel(R) N100"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_inventory(path: str | Path) -> NodeInventory:
    """A declared inventory from YAML (sizes may be written as "64GiB")."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InventoryFileError(f"{path}: cannot read the inventory: {exc}") from None
    if not isinstance(data, dict):
        raise InventoryFileError(f"{path}: an inventory is a mapping (hostname: ..., ...)")
    try:
        inventory = NodeInventory.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"])) or "(top level)"
        raise InventoryFileError(f"{path}: {field}: {first['msg']}") from None
    return inventory.model_copy(update={"declared": True})


def current_inventory() -> NodeInventory:
    """This box now: its declared inventory if ``CORRAL_INVENTORY_FILE`` is set, else a probe."""
    if declared := os.environ.get(INVENTORY_FILE_ENV):
        # The hardware is declared; how busy the box is can still be measured.
        return load_inventory(declared).model_copy(update={"load_avg": load_average()})
    return probe()


def load_average() -> float:
    """Runnable processes averaged over the last minute (what ``uptime`` shows first)."""
    return round(psutil.getloadavg()[0], 2)
