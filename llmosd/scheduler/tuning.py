"""Autotuning a loaded encoder's batch size on the device it runs on, with the profile cached per
(model file digest, device) and reused until the hardware or the model changes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import onnxruntime as ort

if TYPE_CHECKING:
    from tokenizers import Encoding

from llmosd.hardware import Hardware
from llmosd.hardware.autotune import (
    BUDGETS_MS,
    BatchProfile,
    ProfileCache,
    Trial,
    calibrate,
    choose,
    hardware_key,
    memory_bound,
)
from llmosd.runtime import LoadedModel
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.memory import release_quietly
from llmosd.store import ModelStore

log = logging.getLogger(__name__)
_TEXT = "the quick brown fox jumps over the lazy dog while the appliance measures its batches "


@dataclass(frozen=True)
class TuningPolicy:
    enabled: bool = True
    latency_budget_ms: float = 0.0  # 0: by task (BUDGETS_MS)
    seq_len: int = 128  # the input length calibrated at (capped by the model's maximum)
    max_sequences: int = 16  # generation: the ceiling the tuned row count stays under
    kv_cache_bytes: int = 1 << 30  # generation: the KV budget that bounds rows by memory
    kv_width: int = 256  # generation: cache positions per row while calibrating


class Tuner:
    def __init__(self, store: ModelStore, hardware: Hardware, policy: TuningPolicy) -> None:
        self.store = store
        self.hardware = hardware
        self.policy = policy
        self.cache = ProfileCache(store.root)

    def key(self, loaded: LoadedModel) -> str:
        """What the measurement depends on: the device, and on the CPU the threads this instance has
        (instances sharing the CPU split its cores)."""
        device = loaded.placement.device
        gpu = next((g.uuid for g in self.hardware.gpus if g.device_id == device), None)
        cpu = self.hardware.cpu
        cores = loaded.placement.threads or cpu.physical_cores
        return hardware_key(device, cpu.model, cores, gpu, ort.__version__)

    def cached(self, loaded: LoadedModel) -> BatchProfile | None:
        return self.cache.get(self._digest(loaded), loaded.placement.device, self.key(loaded))

    def tune(self, loaded: LoadedModel) -> BatchProfile:
        """Measure and cache (blocking: run it in a thread)."""
        backend = loaded.backend
        if isinstance(backend, TextGenerator):
            return self._tune_generator(loaded, backend)
        m = loaded.manifest
        seq_len = min(self.policy.seq_len, int(m.runtime.get("max_seq_length", 512)))
        budget = self.policy.latency_budget_ms or BUDGETS_MS.get(m.task, 250.0)
        bound = memory_bound(self._free_bytes(loaded.placement.device), self._weights(loaded), self._per_input(loaded))
        encoding = cast("Encoding", backend.prepare([_TEXT * (1 + seq_len // 8)])[0])  # a text's: an Encoding
        encoding.truncate(seq_len)  # exactly the calibrated length
        trials = calibrate(lambda b: backend.run([encoding] * b), bound, budget, repeats=5)
        release_quietly(backend.release, m.ref)  # the calibration's largest batches stayed in the arena
        chosen, reason = choose(trials, budget)
        return self._keep(loaded, len(encoding), budget, bound, trials, chosen, reason)

    def _tune_generator(self, loaded: LoadedModel, model: TextGenerator) -> BatchProfile:
        """Rows decoded together: bounded by the KV budget and ``max_sequences``, then the count with the
        best tokens/s whose decode step stays within the budget (the inter-token latency each stream sees)."""
        m = loaded.manifest
        budget = self.policy.latency_budget_ms or BUDGETS_MS.get(m.task, 100.0)
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

        trials = calibrate(step, bound, budget, repeats=5)
        lm.reset()
        release_quietly(lm.release, m.ref)
        chosen, reason = choose(trials, budget)
        return self._keep(loaded, width, budget, bound, trials, chosen, reason.replace("inputs/s", "tokens/s"))

    def _keep(
        self,
        loaded: LoadedModel,
        seq_len: int,
        budget: float,
        bound: int,
        trials: list[Trial],
        chosen: int,
        reason: str,
    ) -> BatchProfile:
        profile = BatchProfile(
            model=loaded.manifest.ref,
            model_digest=self._digest(loaded),
            device=loaded.placement.device,
            hardware=self.key(loaded),
            seq_len=seq_len,
            latency_budget_ms=budget,
            memory_bound=bound,
            trials=tuple(trials),
            chosen=chosen,
            reason=reason,
        )
        self.cache.put(profile)
        log.info("tuned %s on %s: %s", loaded.manifest.ref, profile.device, reason)
        return profile

    def _digest(self, loaded: LoadedModel) -> str:
        # the graph's, and its weights' where they are a file of their own (one graph may name many)
        return "+".join(f.digest for f in loaded.manifest.files if f.role in ("model", "model-data"))

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
