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

    @property
    def kernels(self) -> tuple[str, ...]:
        """The ISA levels ONNX Runtime's CPU kernels are chosen by on this CPU (kernel_levels)."""
        return kernel_levels(self.isa, self.arch)


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
        out["cpu"]["kernels"] = list(self.cpu.kernels)
        for gpu, raw in zip(self.gpus, out["gpus"], strict=True):
            raw["device_id"] = gpu.device_id
        return out


def kernel_levels(isa: tuple[str, ...] | set[str], arch: str) -> tuple[str, ...]:
    """The instruction sets ONNX Runtime's MLAS chooses its CPU kernels by, as its platform check does
    (core/mlas/lib/platform.cpp): AVX2 with FMA, AVX-VNNI, AVX-512 core (F, BW, DQ, VL), AVX-512 VNNI,
    AMX (tile and int8: its int8 GEMMs only, where the kernel grants the tile state); on arm64 NEON,
    dot product, i8mm, SVE, BF16. What it picks changes speed and, for some shapes, the rounding."""
    flags = set(isa)
    if arch in ("aarch64", "arm64"):
        names = (("asimd", "neon"), ("asimddp", "dotprod"), ("i8mm", "i8mm"), ("sve", "sve"), ("bf16", "bf16"))
        return tuple(level for flag, level in names if flag in flags)
    levels = []
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if "avx_vnni" in flags:
            levels.append("avx-vnni")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            levels.append("avx512")
            if "avx512_vnni" in flags:
                levels.append("avx512-vnni")
        if {"amx_tile", "amx_int8"} <= flags:
            levels.append("amx")
    return tuple(levels)
