"""Batch-size autotuning: an upper bound from memory, then a short calibration at growing batch sizes
that keeps the size with the best throughput within a latency budget (Triton's Model Analyzer idea, done
at load). The decisions are small pure functions; the measuring is a callable, so tests drive both."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HEADROOM = 0.8  # of the memory that is free, what batches may take
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Default latency budgets per task, in ms: an embedding call should feel interactive; a decode step is
# the gap between two tokens of every stream (100 ms: 10 tokens/s, faster than people read).
BUDGETS_MS = {
    "feature-extraction": 250.0,
    "text-classification": 250.0,
    "text-ranking": 250.0,
    "text-generation": 100.0,
}


@dataclass(frozen=True)
class Trial:
    batch: int
    latency_ms: float  # median of the repeats
    throughput: float  # inputs per second

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchProfile:
    model: str
    model_digest: str
    device: str
    hardware: str  # what the measurements depend on; a different value means tune again
    seq_len: int
    latency_budget_ms: float
    memory_bound: int
    trials: tuple[Trial, ...]
    chosen: int
    reason: str
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials"] = [t.as_dict() for t in self.trials]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BatchProfile:
        return cls(**{**raw, "trials": tuple(Trial(**t) for t in raw["trials"])})


def memory_bound(free_bytes: int, weights_bytes: int, per_input_bytes: int, cap: int = SIZES[-1]) -> int:
    """The largest batch whose activations fit in what is free after the weights, with headroom (≥ 1)."""
    usable = free_bytes * HEADROOM - weights_bytes
    if per_input_bytes <= 0:
        return cap
    return max(1, min(cap, int(usable // per_input_bytes)))


def choose(trials: list[Trial], budget_ms: float) -> tuple[int, str]:
    """The size with the best throughput among those within the latency budget, and why."""
    within = [t for t in trials if t.latency_ms <= budget_ms]
    if not within:
        smallest = min(trials, key=lambda t: t.batch)
        return smallest.batch, (
            f"no size met the {budget_ms:g} ms budget; batch {smallest.batch} is the fastest "
            f"({smallest.latency_ms:.1f} ms)"
        )
    best = max(within, key=lambda t: t.throughput)
    over = [t.batch for t in trials if t.latency_ms > budget_ms]
    tail = f"; {over} exceeded the budget" if over else ""
    return best.batch, (
        f"batch {best.batch}: {best.throughput:.0f} inputs/s at {best.latency_ms:.1f} ms, the best throughput "
        f"within {budget_ms:g} ms{tail}"
    )


def calibrate(run: Callable[[int], object], bound: int, budget_ms: float, repeats: int = 3) -> list[Trial]:
    """Time ``run(batch)`` at growing sizes up to ``bound``, then again in ``repeats`` interleaved passes.

    The first pass finds how far to go: it stops past twice the budget or once throughput has fallen
    twice in a row (bigger batches will not win back). The passes that follow time every size in turn,
    so a drift of the machine's speed (±15 % within minutes on a shared VM) hits all sizes alike; each
    trial is the median of its passes."""
    sizes: list[int] = []
    rates: list[float] = []
    falls = 0
    for size in (s for s in SIZES if s <= bound):
        run(size)  # warm this shape
        latency = _timed(run, size)
        sizes.append(size)
        rates.append(size / latency)
        falls = falls + 1 if len(rates) > 1 and rates[-1] < rates[-2] else 0
        if latency * 1000 > 2 * budget_ms or falls >= 2:
            break
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(repeats):
        for size in sizes:
            times[size].append(_timed(run, size))
    return [Trial(s, statistics.median(t) * 1000, s / statistics.median(t)) for s, t in times.items()]


def _timed(run: Callable[[int], object], size: int) -> float:
    t0 = time.perf_counter()
    run(size)
    return time.perf_counter() - t0


def hardware_key(device: str, cpu_model: str, cores: int, gpu_uuid: str | None, ort_version: str) -> str:
    return f"{device}|{gpu_uuid or cpu_model}|{cores} cores|onnxruntime {ort_version}"


class ProfileCache:
    """``profiles/<model-digest>/<device-id>.json`` under the state directory, written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "profiles"

    def _path(self, model_digest: str, device: str) -> Path:
        return self.root / model_digest.replace(":", "-") / f"{device.replace(':', '-')}.json"

    def get(self, model_digest: str, device: str, hardware: str) -> BatchProfile | None:
        """The cached profile, unless the hardware it was measured on differs (then it is stale)."""
        try:
            profile = BatchProfile.from_dict(json.loads(self._path(model_digest, device).read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return profile if profile.hardware == hardware else None

    def put(self, profile: BatchProfile) -> Path:
        path = self._path(profile.model_digest, profile.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile.as_dict(), indent=2))
        os.replace(tmp, path)
        return path
