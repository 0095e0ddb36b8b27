"""Autotuning a loaded encoder's batch size on the device it runs on, with the profile cached per
(model file digest, device) and reused until the hardware or the model changes."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import onnxruntime as ort

if TYPE_CHECKING:
    from tokenizers import Encoding

from llmosd.hardware import Hardware
from llmosd.hardware.autotune import (
    DECODE_BUDGET_MS,
    ENCODER_BUDGET_MS,
    BatchProfile,
    CostModel,
    LoadMeter,
    ProfileCache,
    Sample,
    Trial,
    calibrate,
    choose,
    disturbed,
    fit_cost,
    hardware_key,
    memory_bound,
    sweep,
)
from llmosd.runtime import LoadedModel
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.memory import release_quietly
from llmosd.store import ModelStore

log = logging.getLogger(__name__)
_TEXT = "the quick brown fox jumps over the lazy dog while the appliance measures its batches "


class TuningStopped(Exception):
    """A calibration given up because the daemon stops."""


class Yielded(Exception):
    """A calibration stopped because requests arrived: they have the session (and the cores) to themselves."""


@dataclass(frozen=True)
class TuningPolicy:
    enabled: bool = True
    latency_budget_ms: float = 0.0  # 0: by task (budgets_ms)
    seq_len: int = 128  # the input length calibrated at (capped by the model's maximum)
    max_sequences: int = 16  # generation: the ceiling the tuned row count stays under
    kv_cache_bytes: int = 1 << 30  # generation: the KV budget that bounds rows by memory
    kv_width: int = 256  # generation: cache positions per row while calibrating
    attempts: int = 3  # calibrations tried before a disturbed one is given up on (the defaults stay)
    pause_s: float = 2.0  # between them: a burst of other work may be over
    budgets_ms: Mapping[str, float] = field(default_factory=dict)  # by task: the installed tasks' own


class Tuner:
    def __init__(self, store: ModelStore, hardware: Hardware, policy: TuningPolicy) -> None:
        self.store = store
        self.hardware = hardware
        self.policy = policy
        self.cache = ProfileCache(store.root)
        # Set when the pool closes: a calibration in its thread stops at its next run instead of
        # finishing its attempts (a minute on 2 cores), which the process's exit would wait for.
        self.stopping = threading.Event()

    def _checked(self, run: Callable[..., object], interrupted: Callable[[], bool] | None) -> Callable[..., object]:
        def checked(*args: int) -> object:
            if self.stopping.is_set():
                raise TuningStopped("the daemon is stopping")
            if interrupted is not None and interrupted():
                raise Yielded
            return run(*args)

        return checked

    def key(self, loaded: LoadedModel) -> str:
        """What the measurement depends on: the device, and on the CPU the threads this instance has
        (instances sharing the CPU split its cores)."""
        device = loaded.placement.device
        gpu = next((g.uuid for g in self.hardware.gpus if g.device_id == device), None)
        cpu = self.hardware.cpu
        cores = loaded.placement.threads or cpu.physical_cores
        return hardware_key(device, cpu.model, cores, gpu, ort.__version__)

    def cached(self, loaded: LoadedModel) -> BatchProfile | None:
        return self.cache.get(loaded.manifest.model_digest, loaded.placement.device, self.key(loaded))

    def tune(
        self, loaded: LoadedModel, interrupted: Callable[[], bool] | None = None, attempts: int = 0
    ) -> BatchProfile:
        """Measure and cache (blocking: run it in a thread). A calibration while other processes keep the
        box busy is measured again after a pause; if every attempt was disturbed, the profile says so,
        is not cached, and the instance keeps its defaults (the pool re-tunes later). ``interrupted``
        says whether the instance served requests meanwhile: that disturbs too. ``attempts`` (0: the
        policy's) is 1 for a background re-tune, which tries again later rather than at once."""
        cores = loaded.placement.threads or self.hardware.cpu.physical_cores
        attempts = max(1, attempts or self.policy.attempts)
        for attempt in range(1, attempts + 1):
            meter = LoadMeter(nice=False)  # lower-priority work yields to the calibration
            try:
                profile = self._measure(loaded, interrupted)
            except Yielded:
                # a request arrived: it runs now, not beside a calibration (the first answers after a start
                # ran at half speed beside one); the pool measures again once the instance is idle
                log.info("tuning %s: requests arrived; the calibration stops for them", loaded.manifest.ref)
                why = "not measured: requests arrived, and the calibration stopped for them"
                empty = self._profile(loaded, 0, 0.0, 0, [], 0, why)
                return replace(empty, others_cores=round(meter.others_cores(), 2), disturbed=True)
            others = meter.others_cores()
            if interrupted is not None and interrupted():
                why = f"not trusted: requests arrived while it measured ({profile.reason})"
                return replace(profile, others_cores=round(others, 2), disturbed=True, reason=why)
            if not disturbed(others, cores):
                break
            log.info(
                "tuning %s: other processes kept %.1f cores busy (attempt %d of %d)",
                loaded.manifest.ref,
                others,
                attempt,
                attempts,
            )
            if attempt < attempts and self.stopping.wait(self.policy.pause_s):
                raise TuningStopped("the daemon is stopping")
        if disturbed(others, cores):
            why = f"not trusted: other processes kept {others:.1f} cores busy while it measured ({profile.reason})"
            profile = replace(profile, others_cores=round(others, 2), disturbed=True, reason=why)
            log.warning("tuned %s on %s: %s; the defaults stay", loaded.manifest.ref, profile.device, why)
            return profile
        profile = replace(profile, others_cores=round(others, 2))
        self.cache.put(profile)
        log.info("tuned %s on %s: %s", loaded.manifest.ref, profile.device, profile.reason)
        return profile

    def _measure(self, loaded: LoadedModel, interrupted: Callable[[], bool] | None = None) -> BatchProfile:
        backend = loaded.backend
        if isinstance(backend, TextGenerator):
            return self._tune_generator(loaded, backend, interrupted)
        m = loaded.manifest
        seq_len = min(self.policy.seq_len, int(m.runtime.get("max_seq_length", 512)))
        budget = self.policy.latency_budget_ms or self.policy.budgets_ms.get(m.task, ENCODER_BUDGET_MS)
        bound = memory_bound(self._free_bytes(loaded.placement.device), self._weights(loaded), self._per_input(loaded))
        run = self._checked(_runner(backend), interrupted)
        try:
            trials = calibrate(lambda b: run(b, seq_len), bound, budget, repeats=5)
            # Shorter inputs too, for the cost model: most texts are far below the calibrated length.
            shorter = sorted({max(8, seq_len // 8), max(8, seq_len // 2)} - {seq_len})
            samples = [Sample(t.batch, seq_len, t.latency_ms) for t in trials] + sweep(run, shorter, bound, budget)
        finally:
            release_quietly(backend.release, m.ref)  # the calibration's largest batches stayed in the arena
        chosen, reason = choose(trials, budget)
        cost = fit_cost(samples, budget)
        largest = max((s.batch for s in samples if s.ms <= budget), default=chosen)
        if cost is not None:
            reason += (
                f"; a run costs {cost.fixed_ms:.2f} ms + {cost.token_ms * 1000:.1f} us per padded token, "
                f"up to {largest} inputs and {cost.max_tokens} tokens"
            )
        return self._profile(loaded, seq_len, budget, bound, trials, chosen, reason, cost, largest)

    def _tune_generator(
        self, loaded: LoadedModel, model: TextGenerator, interrupted: Callable[[], bool] | None
    ) -> BatchProfile:
        """Rows decoded together: bounded by the KV budget and ``max_sequences``, then the count with the
        best tokens/s whose decode step stays within the budget (the inter-token latency each stream sees)."""
        m = loaded.manifest
        budget = self.policy.latency_budget_ms or self.policy.budgets_ms.get(m.task, DECODE_BUDGET_MS)
        width = min(self.policy.kv_width, model.context_length // 2)  # room for the steps
        per_row = width * model.lm.bytes_per_token
        bound = max(1, min(self.policy.max_sequences, self.policy.kv_cache_bytes // per_row, model.lm.capacity))
        # A cache of its own: the engine serves beside the calibration, on the same session.
        lm = model.decoder(bound, min(width + 256, model.context_length))
        _, first = lm.prefill([1 + i % 100 for i in range(width)])
        rows = [first]

        def step(n: int) -> None:
            while len(rows) < n:
                rows.append(lm.fork(first))
            lm.decode(rows[:n], [1] * n)  # each step adds a position: ~50 steps fit the 256 spare

        try:
            trials = calibrate(self._checked(step, interrupted), bound, budget, repeats=5)
        finally:
            lm.reset()
            release_quietly(lm.release, m.ref)
        chosen, reason = choose(trials, budget)
        return self._profile(loaded, width, budget, bound, trials, chosen, reason.replace("inputs/s", "tokens/s"))

    def _profile(
        self,
        loaded: LoadedModel,
        seq_len: int,
        budget: float,
        bound: int,
        trials: list[Trial],
        chosen: int,
        reason: str,
        cost: CostModel | None = None,
        largest: int = 0,
    ) -> BatchProfile:
        return BatchProfile(
            model=loaded.manifest.ref,
            model_digest=loaded.manifest.model_digest,
            device=loaded.placement.device,
            hardware=self.key(loaded),
            seq_len=seq_len,
            latency_budget_ms=budget,
            memory_bound=bound,
            trials=tuple(trials),
            chosen=chosen,
            reason=reason,
            cost=cost,
            largest=largest,
        )

    def _weights(self, loaded: LoadedModel) -> int:
        return sum(f.size for f in loaded.manifest.files if f.role in ("model", "model-data"))

    def _free_bytes(self, device: str) -> int:
        gpu = next((g for g in self.hardware.gpus if g.device_id == device), None)
        if gpu is not None:
            return gpu.memory_free
        import psutil

        return int(psutil.virtual_memory().available)

    def _per_input(self, loaded: LoadedModel) -> int:
        """Activation bytes of one input at the model's maximum length: per layer the hidden states,
        the feed-forward and the attention scores, float32, two layers alive at a time."""
        config = self._config(loaded)
        length = int(loaded.manifest.runtime.get("max_seq_length", 512))
        hidden = int(config.get("hidden_size", 768))
        ffn = int(config.get("intermediate_size", 4 * hidden))
        heads = int(config.get("num_attention_heads", 12))
        return 2 * 4 * (length * (4 * hidden + ffn) + heads * length * length)

    def _config(self, loaded: LoadedModel) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = json.loads(Path(self.store.file_path(loaded.manifest, "config")).read_text())
            return raw
        except (OSError, ValueError, KeyError):
            return {}


def _runner(backend: Any) -> Callable[[int, int], object]:
    """``run(batch, length)``: one session run of ``batch`` copies of a text cut to ``length`` tokens."""
    encodings: dict[int, Encoding] = {}

    def run(batch: int, length: int) -> object:
        if length not in encodings:
            encoding = cast("Encoding", backend.prepare([_TEXT * (1 + length // 8)])[0])  # a text's: an Encoding
            encoding.truncate(length)  # exactly this length
            encodings[length] = encoding
        return backend.run([encodings[length]] * batch)

    return run
