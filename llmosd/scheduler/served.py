"""A served model: one or more instances of one version (a session each, on the device placement gave
it), each behind its own batcher (encoders) or continuous-batching engine (causal LMs). Requests go to
the instance with the least outstanding work, as Triton spreads them over an instance group."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from llmosd.hardware.autotune import BatchProfile
from llmosd.runtime import LoadedModel, Output
from llmosd.runtime.backend import Input
from llmosd.runtime.tensors import TensorModel
from llmosd.scheduler.batcher import BatchPolicy, DynamicBatcher
from llmosd.scheduler.generation import GenerationEngine
from llmosd.scheduler.priority import NORMAL, PRIORITIES
from llmosd.scheduler.supervisor import Supervisor
from llmosd.scheduler.tensor_batcher import TensorBatcher
from llmosd.store import Manifest

# An instance whose runs keep taking under FAST_PACE of what its profile predicts, over PACED_RUNS
# runs, was tuned on a box busier than it is now: it is measured again (at most MAX_PACE_RETUNES times,
# so a cost model that is simply off cannot keep the tuner running).
PACED_RUNS = 64
FAST_PACE = 0.67
MAX_PACE_RETUNES = 2


@dataclass
class Instance:
    loaded: LoadedModel
    batcher: DynamicBatcher[Any] | None = None
    engine: GenerationEngine | None = None
    tensors: TensorBatcher | None = None  # raw tensors (/v2), started on first use
    profile: BatchProfile | None = None  # the autotuned batch size on this device, once known
    outstanding: int = 0  # inputs or tensor requests submitted here and not answered yet (loop-side)
    gave_up: Callable[[str], None] | None = None  # the pool's: a worker died too often, unload the model
    pace_retunes: int = 0  # re-tunes asked for by the pace since the last quiet profile (bounded)
    retune_after: float = 0.0  # monotonic time before which a disturbed profile is not re-measured
    disturbed_retunes: int = 0  # in a row: each doubles the wait (a box busy for hours is left alone)

    @property
    def device(self) -> str:
        return self.loaded.placement.device

    def load(self) -> int:
        return self.outstanding + (self.engine.load if self.engine is not None else 0)

    def supervisors(self) -> list[Supervisor]:
        return [w.supervisor for w in self._workers().values()]

    def healthy(self) -> bool:
        """Every worker here is running (one that died is restarting or was given up on)."""
        return all(s.healthy for s in self.supervisors())

    def restarts(self) -> int:
        return sum(s.restarts for s in self.supervisors())

    def queued(self) -> int:
        if self.batcher is not None:
            return self.batcher.queued
        return self.engine.stats.waiting if self.engine is not None else 0

    def queued_by_priority(self) -> dict[str, int]:
        if self.batcher is not None:
            return self.batcher.queued_by_priority()
        return dict(self.engine.stats.waiting_by_priority) if self.engine is not None else {}

    def outcomes(self) -> tuple[int, int]:
        """Requests the engines here answered and failed (refused, cancelled and raw-tensor ones —
        whose failures are mostly the client's tensors — are neither)."""
        ok = failed = 0
        if self.batcher is not None:
            ok, failed = self.batcher.stats.completed, self.batcher.stats.failed
        if self.engine is not None:
            ok, failed = ok + self.engine.stats.completed, failed + self.engine.stats.failed
        return ok, failed

    def busy(self) -> bool:
        queued = self.batcher is not None and self.batcher.queued > 0
        generating = self.engine is not None and (self.engine.stats.running + self.engine.stats.waiting) > 0
        return self.outstanding > 0 or queued or generating

    def apply(self, profile: BatchProfile, base: BatchPolicy | None = None) -> None:
        """Switch to the tuned sizes (the workers read their policy and limits at every step), over
        ``base`` (the configured policy) where given. A disturbed profile is shown, not applied."""
        self.profile = profile
        if not profile.disturbed:
            self.disturbed_retunes = 0
        if self.batcher is not None:
            policy = base or self.batcher.policy
            if not profile.disturbed:  # an encoder: up to the largest size its budget allows, priced
                policy = dataclasses.replace(policy, max_batch=max(profile.chosen, profile.largest), cost=profile.cost)
            self.batcher.policy = policy
            self.batcher.stats.pace, self.batcher.stats.paced = 1.0, 0
        if self.engine is not None and not profile.disturbed:  # rows decoded together
            self.engine.limits = dataclasses.replace(self.engine.limits, max_sequences=profile.chosen)

    def rebase(self, policy: BatchPolicy) -> None:
        """New configured limits (a reload); tuned sizes stay on top of them: they were measured here."""
        if self.batcher is None:
            return
        if self.profile is not None:
            self.apply(self.profile, base=policy)
        else:
            self.batcher.policy = policy

    def retune_reason(self) -> str | None:
        """Why this instance should be measured again, if it should: its last calibration was disturbed,
        or its runs have gone well faster than its profile predicts (it was measured on a busy box)."""
        if self.profile is None:
            return None
        if self.profile.disturbed:
            if time.monotonic() < self.retune_after:
                return None
            return "its last calibration was disturbed"
        stats = self.batcher.stats if self.batcher is not None else None
        if stats and stats.paced >= PACED_RUNS and stats.pace < FAST_PACE and self.pace_retunes < MAX_PACE_RETUNES:
            return f"its runs take {stats.pace:.2f} of the time its profile predicts"
        return None

    def _workers(self) -> dict[str, DynamicBatcher[Any] | GenerationEngine | TensorBatcher]:
        parts = {"batcher": self.batcher, "generation": self.engine, "tensors": self.tensors}
        return {kind: w for kind, w in parts.items() if w is not None}

    async def close(self) -> None:
        for part in (self.batcher, self.engine, self.tensors):
            if part is not None:
                await part.close()

    def status(self) -> dict[str, object]:
        p = self.loaded.placement
        out: dict[str, object] = {
            "device": p.device,
            "providers": list(p.providers),
            "threads": p.threads,
            "note": p.note,
            "tuned": self.profile.reason if self.profile else None,
            "queued": self.queued(),
            "healthy": self.healthy(),
            "workers": {kind: w.supervisor.status() for kind, w in self._workers().items()},
        }
        if self.batcher is not None:
            out |= {"max_batch": self.batcher.policy.max_batch, "batcher": self.batcher.stats.as_dict()}
        if self.engine is not None:
            out |= {"max_sequences": self.engine.limits.max_sequences, "generation": self.engine.stats.as_dict()}
        if self.tensors is not None:
            out["tensors"] = self.tensors.stats.as_dict()
        return out


@dataclass
class ServedModel:
    instances: list[Instance]
    last_used: float = field(default_factory=time.monotonic)  # for least-recently-used unloading
    in_use: int = 0  # requests holding it (between acquire and release): never unloaded meanwhile
    keep_alive_s: float | None = None  # idle time before unloading; None: the pool's default
    _turn: int = 0  # breaks ties between equally loaded instances in turn

    @property
    def loaded(self) -> LoadedModel:
        """The first instance's runtime: what every instance shares (manifest, tokenizer, task)."""
        return self.instances[0].loaded

    @property
    def manifest(self) -> Manifest:
        return self.loaded.manifest

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def devices(self) -> list[str]:
        return [i.device for i in self.instances]

    @property
    def generates(self) -> bool:
        return self.instances[0].engine is not None

    def healthy(self) -> bool:
        return all(i.healthy() for i in self.instances)

    def pick(self) -> Instance:
        """The healthy instance with the least outstanding work; equals in turn. One whose worker is
        down is passed over while another can serve (its own requests then get its 503)."""
        self._turn += 1
        n = len(self.instances)
        up = [i for i in self.instances if i.healthy()] or self.instances
        return min(up, key=lambda i: (i.load(), (self.instances.index(i) - self._turn) % n))

    def outcomes(self) -> tuple[int, int]:
        """(answered, failed) requests over every instance, since this version was loaded."""
        counts = [i.outcomes() for i in self.instances]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def busy(self) -> bool:
        return self.in_use > 0 or any(i.busy() for i in self.instances)

    def apply(self, profile: BatchProfile) -> None:
        for instance in self.instances:
            if instance.device == profile.device:
                instance.apply(profile)

    async def infer(self, inputs: Sequence[Input], priority: int = NORMAL, truncate: bool = True) -> list[Output]:
        instance = self.pick()
        if instance.batcher is None:
            raise TypeError(f"model {self.name!r} generates text; it has no batch inference")
        instance.outstanding += len(inputs)
        try:
            return await instance.batcher.submit(inputs, priority, truncate)
        finally:
            instance.outstanding -= len(inputs)

    @property
    def generator(self) -> GenerationEngine:
        """The engine the next request should go to (a request's sequences all go to one engine)."""
        engine = self.pick().engine
        if engine is None:
            raise TypeError(f"model {self.name!r} does not generate text")
        return engine

    async def infer_tensors(
        self, feeds: dict[str, npt.NDArray[Any]], max_rows: int, max_queue: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Raw tensors (/v2) through the chosen instance's tensor batcher, started on first use."""
        instance = self.pick()
        if instance.tensors is None:
            instance.tensors = TensorBatcher(self.name, TensorModel(instance.loaded.session), max_rows, max_queue)
            instance.tensors.gave_up = instance.gave_up
            instance.tensors.start()
        instance.outstanding += 1
        try:
            return await instance.tensors.submit(feeds)
        finally:
            instance.outstanding -= 1

    async def close(self) -> None:
        for instance in self.instances:
            await instance.close()

    def status(self) -> dict[str, object]:
        m = self.manifest
        by_priority = dict.fromkeys(PRIORITIES, 0)
        for instance in self.instances:
            for k, v in instance.queued_by_priority().items():
                by_priority[k] = by_priority.get(k, 0) + v
        out: dict[str, object] = {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "precision": m.precision,
            "devices": self.devices,
            "queued": sum(i.queued() for i in self.instances),
            "queued_by_priority": by_priority,
            "instances": [i.status() for i in self.instances],
        }
        engine = self.instances[0].engine
        if engine is not None:
            out |= {
                "context_length": engine.model.context_length,
                "kv_bytes_per_token": engine.model.lm.bytes_per_token,
            }
        return out
