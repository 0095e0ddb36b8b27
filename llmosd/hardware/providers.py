"""Which ONNX Runtime execution providers really create a session here, and why not where they do not.

ORT lists the CUDA provider whenever onnxruntime-gpu is installed, then falls back to CPU printing errors.
Each listed provider is asked for a session on a 65-byte model with ORT's logging silenced; a CUDA
provider that falls back is explained by the shared libraries it needs that cannot be opened."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import onnxruntime as ort

from llmosd.hardware.model import ProviderStatus
from llmosd.runtime.providers import PROBE_MODEL, quiet_ort, session_options

# What onnxruntime-gpu's CUDA provider dlopens (CUDA 12, cuDNN 9).
CUDA_LIBRARIES = (
    "libcuda.so.1",
    "libcudart.so.12",
    "libcublas.so.12",
    "libcublasLt.so.12",
    "libcufft.so.11",
    "libcurand.so.10",
    "libcudnn.so.9",
)
_REQUIRED = {  # what must open before a session is even tried: the driver (never from pip), TensorRT
    "CUDAExecutionProvider": ("libcuda.so.1",),
    "TensorrtExecutionProvider": ("libcuda.so.1", "libnvinfer.so.10"),
}
_SKIP = {"AzureExecutionProvider"}  # a remote-endpoint provider: nothing to probe on the box


def missing_libraries(names: tuple[str, ...] = CUDA_LIBRARIES) -> list[str]:
    missing = []
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def _creates(provider: str) -> tuple[bool, str]:
    try:
        with quiet_ort():
            session = ort.InferenceSession(PROBE_MODEL, session_options(1), providers=[provider])
        return provider in session.get_providers(), ""
    except Exception as exc:
        return False, str(exc).splitlines()[0][:200]


def probe_providers(
    available: Callable[[], list[str]] = ort.get_available_providers,
    creates: Callable[[str], tuple[bool, str]] = _creates,
    missing: Callable[[tuple[str, ...]], list[str]] = missing_libraries,
) -> tuple[ProviderStatus, ...]:
    out = []
    for name in available():
        if name in _SKIP:
            continue
        # No driver (or no TensorRT): do not ask ORT, which prints to stderr when the provider cannot load.
        absent = missing(_REQUIRED[name]) if name in _REQUIRED else []
        if absent:
            out.append(ProviderStatus(name, False, f"cannot open {', '.join(absent)}"))
            continue
        ok, error = creates(name)
        reason = ""
        if not ok:  # the CUDA runtime libraries may come from pip packages ORT preloads: name them only now
            lacking = missing(CUDA_LIBRARIES) if name in _REQUIRED else []
            reason = f"cannot open {', '.join(lacking)}" if lacking else error or "the session fell back to CPU"
        out.append(ProviderStatus(name, ok, reason))
    return tuple(out)
