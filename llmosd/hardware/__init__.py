"""The hardware probe: what the box has (CPU, NVIDIA GPUs, ONNX Runtime providers that really load)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmosd.hardware.cpu import probe_cpu
from llmosd.hardware.gpu import probe_gpus
from llmosd.hardware.model import CpuInfo, GpuInfo, Hardware, ProviderStatus
from llmosd.hardware.providers import probe_providers


def probe(
    *,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    nvml: Any = None,
    providers: Callable[[], tuple[ProviderStatus, ...]] = probe_providers,
) -> Hardware:
    """Everything the box offers, as frozen facts. Never raises: an unknown is reported, not thrown.
    Blocking (NVML, a probe session): call it in a thread from the event loop."""
    gpus, driver, cuda, nvml_state = probe_gpus(nvml)
    return Hardware(
        cpu=probe_cpu(cpuinfo),
        gpus=gpus,
        driver_version=driver,
        cuda_driver_version=cuda,
        nvml=nvml_state,
        providers=providers(),
    )


__all__ = ["CpuInfo", "GpuInfo", "Hardware", "ProviderStatus", "probe"]
