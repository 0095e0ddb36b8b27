"""Where a model may run: a per-device memory ledger filled from the hardware probe. Nothing is loaded
that would not fit; a model that fits nowhere is refused with what it needs and what each device has.
The decisions are small pure functions (Ollama's lesson); their inputs are logged."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llmosd.hardware import Hardware
from llmosd.store import Manifest

log = logging.getLogger(__name__)

# Resident bytes per byte of model file once ORT has loaded it, for manifests that carry no measurement
# (exported before the exporter measured it): 530 MB for optimum's 234 MB SmolLM2 int8 file, so 2.3.
LOAD_FACTOR = 2.3
WORKSPACE = 64 << 20  # activations of an encoder batch, the session's arena


class PlacementError(Exception):
    """No device has room for the model."""


def need_bytes(manifest: Manifest, kv_cache_bytes: int) -> int:
    """Memory a model takes once loaded: its weights as ORT holds them (what the exporter measured a
    session of it to keep resident, else the file's size times LOAD_FACTOR), plus its KV-cache budget
    (generation) or a workspace for its batches (encoders)."""
    measured = manifest.recipe.get("resident_bytes")
    weights = sum(f.size for f in manifest.files if f.role in ("model", "model-data"))
    held = int(measured) if isinstance(measured, int) and measured > 0 else int(weights * LOAD_FACTOR)
    extra = kv_cache_bytes if manifest.task == "text-generation" else WORKSPACE
    return held + extra


def candidates(manifest: Manifest, hardware: Hardware) -> list[str]:
    """Devices in preference order: GPUs the CUDA provider can use, then the CPU, as the artifact allows."""
    out = []
    if "cuda" in manifest.devices and hardware.cuda == "loads":
        out += [g.device_id for g in sorted(hardware.gpus, key=lambda g: -g.memory_free)]
    if "cpu" in manifest.devices:
        out.append("cpu")
    return out


def _mb(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MB"


@dataclass
class Ledger:
    capacity: dict[str, int]  # bytes each device offers to models (measured free at start)
    used: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> model -> bytes

    @classmethod
    def from_hardware(cls, hardware: Hardware) -> Ledger:
        capacity = {"cpu": hardware.cpu.memory_available}
        for gpu in hardware.gpus:
            capacity[gpu.device_id] = gpu.memory_free
        return cls(capacity)

    def free(self, device: str) -> int:
        return self.capacity.get(device, 0) - sum(self.used.get(device, {}).values())

    def place(self, name: str, need: int, devices: list[str]) -> str:
        """The first device with room for ``need`` bytes; PlacementError naming every device otherwise."""
        return self.plan(name, need, devices, 1)[0]

    def plan(self, name: str, need: int, devices: list[str], per_device: int) -> list[str]:
        """Where a model's instances go (one device per instance): ``per_device`` copies on every GPU
        among ``devices`` with room for them (Triton's instance-group count, on each GPU), fewer where
        fewer fit; where no GPU has room for one, up to ``per_device`` on the CPU. PlacementError, naming
        what it needs and what every device has, when not one instance fits anywhere."""
        fits = {d: min(per_device, self.free(d) // max(need, 1)) for d in devices if d in self.capacity}
        out = [d for d in devices if d != "cpu" for _ in range(fits.get(d, 0))]
        if not out:
            out = ["cpu"] * fits.get("cpu", 0)
        if out:
            log.info("placing %s (%s each) on %s", name, _mb(need), ", ".join(out))
            return out
        where = ", ".join(f"{d} {_mb(max(self.free(d), 0))}" for d in devices if d in self.capacity)
        raise PlacementError(f"model {name!r} needs {_mb(need)} and fits on no device: free {where or 'none'}")

    def reserve(self, name: str, device: str, need: int) -> None:
        """Account one more instance of ``name`` on ``device``."""
        models = self.used.setdefault(device, {})
        models[name] = models.get(name, 0) + need

    def release(self, name: str) -> None:
        for models in self.used.values():
            models.pop(name, None)

    def as_dict(self) -> dict[str, object]:
        return {
            d: {"capacity": cap, "free": self.free(d), "models": dict(self.used.get(d, {}))}
            for d, cap in self.capacity.items()
        }
