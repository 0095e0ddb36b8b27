"""Batch-size autotuning: an upper bound from memory, then a short calibration at growing batch sizes
that keeps the size with the best throughput within a latency budget (Triton's Model Analyzer idea, done
at load). The decisions are small pure functions; the measuring is a callable, so tests drive both."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmosd.store.profiles import PROFILES, Profiles

HEADROOM = 0.8  # of the memory that is free, what batches may take
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Latency budgets where a task names none (each task's Task.latency_budget_ms): an encoder batch should
# feel interactive; a decode step is the gap between two tokens of every stream (100 ms: 10 tokens/s).
ENCODER_BUDGET_MS = 250.0
DECODE_BUDGET_MS = 100.0


@dataclass(frozen=True)
class Trial:
    batch: int
    latency_ms: float  # median of the repeats
    throughput: float  # inputs per second

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CostModel:
    """What one encoder run costs on this device, fitted to the calibration's timings:
    ``fixed_ms + n * longest * (token_ms + token_sq_ms * longest)`` for n inputs padded to ``longest``
    (the session's fixed overhead, the per-token work, attention's per-token-pair work). ``max_tokens`` is
    the padded size of a run past which throughput stopped growing (within 5 %, at every length)."""

    fixed_ms: float
    token_ms: float
    token_sq_ms: float
    max_tokens: int

    def run_ms(self, n: int, longest: int) -> float:
        return self.fixed_ms + n * longest * (self.token_ms + self.token_sq_ms * longest)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    batch: int
    length: int
    ms: float  # median run time


def fit_cost(samples: list[Sample], budget_ms: float) -> CostModel | None:
    """Least squares of the relative error over the samples, every coefficient kept non-negative (a
    negative one is dropped and the rest refitted); None when the timings do not determine a positive
    per-token cost."""
    import numpy as np

    if len({(s.batch, s.length) for s in samples}) < 3:
        return None
    n = np.array([s.batch for s in samples], dtype=np.float64)
    length = np.array([s.length for s in samples], dtype=np.float64)
    y = np.array([s.ms for s in samples], dtype=np.float64)
    columns = {"fixed": np.ones_like(n), "token": n * length, "sq": n * length * length}
    keep = list(columns)
    weight = 1 / np.maximum(y, 1e-6)  # relative errors: a short run's fixed cost counts as much as a long one
    while True:
        design = np.stack([columns[k] for k in keep], axis=1) * weight[:, None]
        coef, *_ = np.linalg.lstsq(design, y * weight, rcond=None)
        fitted = dict(zip(keep, (float(c) for c in coef), strict=True))
        negative = [k for k, c in fitted.items() if c < 0 and k != "token"]
        if not negative:
            break
        keep.remove(negative[0])
    if fitted.get("token", 0.0) <= 0:
        return None
    return CostModel(fitted.get("fixed", 0.0), fitted["token"], fitted.get("sq", 0.0), _plateau(samples, budget_ms))


def _plateau(samples: list[Sample], budget_ms: float) -> int:
    """Per length, the smallest run (in padded tokens) within 5 % of that length's best throughput and
    within the budget; the largest of those: a bigger run buys no throughput at any length measured."""
    out = 0
    for length in {s.length for s in samples}:
        runs = [s for s in samples if s.length == length and s.ms <= budget_ms]
        runs = runs or [min((s for s in samples if s.length == length), key=lambda s: s.ms)]
        best = max(s.batch / s.ms for s in runs)
        out = max(out, min(s.batch for s in runs if s.batch / s.ms >= 0.95 * best) * length)
    return out


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
    cost: CostModel | None = None  # encoders: what a run of n inputs of a length costs here
    largest: int = 0  # encoders: the largest batch any calibration length ran within the budget
    others_cores: float = 0.0  # the cores other processes kept busy while this was measured
    disturbed: bool = False  # they were too many: the figures are not trusted, nor cached

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials"] = [t.as_dict() for t in self.trials]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BatchProfile:
        cost = raw.get("cost")
        return cls(
            **{
                **raw,
                "trials": tuple(Trial(**t) for t in raw["trials"]),
                "cost": CostModel(**cost) if cost else None,
            }
        )


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


def calibrate(
    run: Callable[[int], object], bound: int, budget_ms: float, repeats: int = 3, beyond: float = 2.0
) -> list[Trial]:
    """Time ``run(batch)`` at growing sizes up to ``bound``, then again in ``repeats`` interleaved passes.

    The first pass finds how far to go: it stops past ``beyond`` times the budget or once throughput has
    fallen twice in a row (bigger batches will not win back). The passes that follow time every size in turn,
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
        if latency * 1000 > beyond * budget_ms or falls >= 2:
            break
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(repeats):
        for size in sizes:
            times[size].append(_timed(run, size))
    return [Trial(s, statistics.median(t) * 1000, s / statistics.median(t)) for s, t in times.items()]


def sweep(
    run: Callable[[int, int], object], lengths: list[int], bound: int, budget_ms: float, repeats: int = 3
) -> list[Sample]:
    """``calibrate`` at each length (``run(batch, length)``): the points a cost model is fitted to. Each
    stops at the first size past the budget: the fit and the largest size within the budget need nothing
    beyond it, and the sizes past it are the slowest runs of a calibration (about half its time)."""
    out = []
    for length in lengths:
        trials = calibrate(functools.partial(_at_length, run, length), bound, budget_ms, repeats, beyond=1.0)
        out += [Sample(t.batch, length, t.latency_ms) for t in trials]
    return out


def _at_length(run: Callable[[int, int], object], length: int, batch: int) -> object:
    return run(batch, length)


# A calibration is disturbed when other processes kept this many cores busy on average (or a quarter of
# the cores it runs on, if more): a tune on a loaded box once cached batch 2 at 51 inputs/s for good,
# where a quiet one picks 4 to 8.
DISTURBED_CORES = 0.5


class LoadMeter:
    """The cores the rest of the box kept busy (steal included: a VM's neighbours) while this process
    measured, from /proc/stat's totals less this process's own CPU time (psutil). ``nice`` False leaves
    out processes at a lower priority (nice > 0: a build, a backup): they yield the cores to the
    calibration's threads (nice 19 gets about 1.5 % of a core it shares with them), so they do not make a
    calibration untrusted. The loop watch counts them (True): a box kept fully busy delays a wake-up
    whatever the priorities, and such a wake-up is starvation, not a block."""

    def __init__(self, nice: bool = True) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._nice = nice
        self._start = self._read()

    def restart(self) -> None:
        """Measure from now on (the loop watch's next interval)."""
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        t = self._psutil.cpu_times()
        busy = t.user + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        busy += t.nice if self._nice else 0.0
        busy += getattr(t, "steal", 0.0)
        own = self._me.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def others_cores(self) -> float:
        now, busy, own = self._read()
        wall = max(now - self._start[0], 1e-3)
        return max(0.0, ((busy - self._start[1]) - (own - self._start[2])) / wall)


def disturbed(others_cores: float, cores: int) -> bool:
    return others_cores > max(DISTURBED_CORES, 0.25 * cores)


def _timed(run: Callable[[int], object], size: int) -> float:
    t0 = time.perf_counter()
    run(size)
    return time.perf_counter() - t0


def hardware_key(device: str, cpu_model: str, cores: int, gpu_uuid: str | None, ort_version: str) -> str:
    return f"{device}|{gpu_uuid or cpu_model}|{cores} cores|onnxruntime {ort_version}"


class ProfileCache:
    """Batch profiles in the store's ``profiles/`` (``llmosd.store.profiles``), typed, and stale when the
    hardware they were measured on differs."""

    def __init__(self, state_dir: Path) -> None:
        self.files = Profiles(state_dir / PROFILES)

    def get(self, model_digest: str, device: str, hardware: str) -> BatchProfile | None:
        """The cached profile, unless the hardware it was measured on differs (then it is stale)."""
        raw = self.files.get(model_digest, device)
        try:
            profile = BatchProfile.from_dict(raw) if raw is not None else None
        except (ValueError, TypeError, KeyError):
            return None
        return profile if profile is not None and profile.hardware == hardware else None

    def put(self, profile: BatchProfile) -> Path:
        return self.files.put(profile.model_digest, profile.device, profile.as_dict())
