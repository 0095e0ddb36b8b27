"""NVIDIA GPUs through NVML (nvidia-ml-py's ``pynvml``). No library, no driver, no GPU: an empty list and
the reason, never an exception. ``nvml`` is injectable: tests pass a fake module (a 2-GPU box, a 4 GB GPU,
an integrated GPU), the only place hardware is faked."""

from __future__ import annotations

import contextlib
from typing import Any

from llmosd.hardware.model import GpuInfo

_INTEGRATED_NAMES = ("orin", "xavier", "tegra", "jetson", "gb10")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def probe_gpus(nvml: Any = None) -> tuple[tuple[GpuInfo, ...], str | None, str | None, str]:
    """(GPUs, driver version, CUDA driver version, "ok" or why NVML gave nothing)."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return (), None, None, "nvidia-ml-py is not installed"
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return (), None, None, f"NVML unavailable: {exc}"
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _cuda_version(int(nvml.nvmlSystemGetCudaDriverVersion()))
        gpus = tuple(_gpu(nvml, i) for i in range(int(nvml.nvmlDeviceGetCount())))
        return gpus, driver, cuda, "ok" if gpus else "NVML found no GPU"
    except Exception as exc:
        return (), None, None, f"NVML query failed: {exc}"
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    try:  # a GPU on the SoC has no PCI bus of its own
        nvml.nvmlDeviceGetPciInfo(handle)
        on_pci = True
    except Exception:
        on_pci = False
    return GpuInfo(
        index=index,
        name=name,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_total=int(memory.total),
        memory_free=int(memory.free),
        compute_capability=(int(major), int(minor)),
        integrated=not on_pci or any(n in name.lower() for n in _INTEGRATED_NAMES),
    )


def gpu_usage(nvml: Any = None) -> list[tuple[str, int, int, int]]:
    """(device id, memory total, memory used, utilisation %) per GPU, now; empty without NVML."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return []
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            out.append((f"cuda:{i}", int(memory.total), int(memory.used), util))
        return out
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
