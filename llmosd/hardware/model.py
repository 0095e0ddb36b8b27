"""What the probe reports: plain frozen facts about the box, with a JSON form for /api/hardware."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmosd.runtime.providers import CUDA, CudaState


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    physical_cores: int
    logical_cores: int
    isa: tuple[str, ...]  # the flags that matter to kernels: avx2, avx512f, avx512_vnni, avx_vnni, amx_*, neon, sve
    memory_total: int  # bytes
    memory_available: int


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total: int  # bytes
    memory_free: int
    compute_capability: tuple[int, int]
    integrated: bool  # shares system memory (Jetson/Tegra): its memory is the CPU's too

    @property
    def device_id(self) -> str:
        return f"cuda:{self.index}"


@dataclass(frozen=True)
class ProviderStatus:
    name: str
    available: bool  # a session on it really created
    reason: str = ""  # why not, in words a person can act on


@dataclass(frozen=True)
class Hardware:
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml: str = "not checked"  # "ok", or why NVML gave nothing (no library, no driver, no GPU)
    providers: tuple[ProviderStatus, ...] = ()

    def provider(self, name: str) -> ProviderStatus | None:
        return next((p for p in self.providers if p.name == name), None)

    @property
    def cuda(self) -> CudaState:
        """What the probe found of the CUDA provider: what the provider choice is built from."""
        status = self.provider(CUDA)
        return "absent" if status is None else "loads" if status.available else "fails"

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for gpu, raw in zip(self.gpus, out["gpus"], strict=True):
            raw["device_id"] = gpu.device_id
        return out
