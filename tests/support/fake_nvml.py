"""A stand-in for the ``pynvml`` module: the same functions and error class, with
GPUs (or failures) the test chooses. ``nodes.hardware.probe(nvml=...)`` takes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    """As pynvml's: every NVML failure is a subclass of it."""


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
    def __str__(self) -> str:
        return "Not Supported"


@dataclass
class FakeGpu:
    name: str
    uuid: str
    total: int
    free: int
    capability: tuple[int, int] | None = (8, 6)


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    driver: str = "550.120"
    fail_init: NVMLError | None = None
    fail_count: NVMLError | None = None
    shutdowns: int = 0

    NVMLError = NVMLError

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names from here on
        if self.fail_init:
            raise self.fail_init

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self.driver

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        if self.fail_count:
            raise self.fail_count
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:  # noqa: N802
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:  # noqa: N802 - old pynvml: bytes
        return gpu.name.encode()

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:  # noqa: N802
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.total - gpu.free)

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu) -> tuple[int, int]:  # noqa: N802
        if gpu.capability is None:
            raise NVMLError_NotSupported()
        return gpu.capability
