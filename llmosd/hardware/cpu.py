"""The CPU and system memory, from /proc/cpuinfo and psutil (no exception escapes: unknowns are empty)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from llmosd.hardware.model import CpuInfo

# Flags the ORT/MLAS kernels choose between; /proc/cpuinfo spells them like this on x86 and arm64.
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",  # arm64's NEON
    "asimddp",  # arm64's dot product
    "sve",
    "i8mm",
    "bf16",
)


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """Model name and the set of flags of the first processor block."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def probe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text())
    except OSError:
        model, flags = "", set[str]()
    isa = [f for f in ISA_FLAGS if f in flags]
    if "asimd" in flags:
        isa.append("neon")
    logical = os.cpu_count() or 1
    physical, total, available = logical, 0, 0
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
        memory = psutil.virtual_memory()
        total, available = int(memory.total), int(memory.available)
    except Exception:  # psutil cannot read the topology in some containers
        pass
    return CpuInfo(
        model=model or platform.processor() or "unknown",
        arch=platform.machine(),
        physical_cores=physical,
        logical_cores=logical,
        isa=tuple(isa),
        memory_total=total,
        memory_available=available,
    )
