"""A served model: one or more instances of one version (a session each, on the device placement gave
it), each with exactly one worker (``worker.py``): a dynamic batcher (encoders) or a continuous-batching
engine (causal LMs). Raw tensors (/v2) for an instance's session go through a tensor batcher of their
own, an instance of its own started on first use. Requests go to the instance with the least
outstanding work, as Triton spreads them over an instance group."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

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


Work = DynamicBatcher[Any] | GenerationEngine | TensorBatcher


@dataclass
class Instance:
    """One session on one device and the one worker that runs it."""

    loaded: LoadedModel
    worker: Work
    profile: BatchProfile | None = None  # the autotuned batch size on this device, once known
    outstanding: int = 0  # inputs or tensor requests submitted here and not answered yet (loop-side)
    gave_up: Callable[[str], None] | None = None  # the pool's: a worker died too often, unload the model
    pace_retunes: int = 0  # re-tunes asked for by the pace since the last quiet profile (bounded)
    retune_after: float = 0.0  # monotonic time before which a disturbed profile is not re-measured
    disturbed_retunes: int = 0  # in a row: each doubles the wait (a box busy for hours is left alone)

    @property
    def device(self) -> str:
        return self.loaded.placement.device

    @property
    def supervisor(self) -> Supervisor:
        return self.worker.supervisor

    def load(self) -> int:
        return self.outstanding + self.worker.in_flight()

    def healthy(self) -> bool:
        """Its worker is running (one that died is restarting or was given up on)."""
        return self.supervisor.healthy

    def restarts(self) -> int:
        return self.supervisor.restarts

    def queued(self) -> int:
        return self.worker.waiting()

    def queued_by_priority(self) -> dict[str, int]:
        return self.worker.waiting_by_priority()

    def outcomes(self) -> tuple[int, int]:
        """Requests the worker here answered and failed (refused, cancelled and raw-tensor ones —
        whose failures are mostly the client's tensors — are neither)."""
        return self.worker.outcomes()

    def busy(self) -> bool:
        return self.outstanding > 0 or self.worker.busy()

    def apply(self, profile: BatchProfile, base: BatchPolicy | None = None) -> None:
        """Switch to the tuned sizes (the workers read their policy and limits at every step), over
        ``base`` (the configured policy) where given. A disturbed profile is shown, not applied."""
        self.profile = profile
        if not profile.disturbed:
            self.disturbed_retunes = 0
        self.worker.apply(profile, base)

    def rebase(self, policy: BatchPolicy) -> None:
        """New configured limits (a reload); tuned sizes stay on top of them: they were measured here."""
        if self.profile is not None:
            self.apply(self.profile, base=policy)
        else:
            self.worker.rebase(policy)

    def retune_reason(self) -> str | None:
        """Why this instance should be measured again, if it should: its last calibration was disturbed,
        or its runs have gone well faster than its profile predicts (it was measured on a busy box)."""
        if self.profile is None:
            return None
        if self.profile.disturbed:
            if time.monotonic() < self.retune_after:
                return None
            return "its last calibration was disturbed"
        paced, pace = self.worker.pace()
        if paced >= PACED_RUNS and pace < FAST_PACE and self.pace_retunes < MAX_PACE_RETUNES:
            return f"its runs take {pace:.2f} of the time its profile predicts"
        return None

    async def close(self) -> None:
        await self.worker.close()

    def status(self) -> dict[str, object]:
        p = self.loaded.placement
        return {
            "device": p.device,
            "providers": list(p.providers),
            "threads": p.threads,
            "note": p.note,
            "tuned": self.profile.reason if self.profile else None,
            "queued": self.queued(),
            "healthy": self.healthy(),
            "workers": {self.worker.role: self.supervisor.status()},
        } | self.worker.report()


@dataclass
class ServedModel:
    instances: list[Instance]  # each with its batcher or generation engine
    # Raw tensors (/v2) for instance k: the same session behind a tensor batcher, started on first use.
    raw: dict[int, Instance] = field(default_factory=dict)
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
        return isinstance(self.instances[0].worker, GenerationEngine)

    def _all(self) -> list[Instance]:
        return [*self.instances, *self.raw.values()]

    def healthy(self) -> bool:
        return all(i.healthy() for i in self._all())

    def restarts(self) -> int:
        return sum(i.restarts() for i in self._all())

    def _load(self, k: int) -> int:
        raw = self.raw.get(k)
        return self.instances[k].load() + (raw.load() if raw is not None else 0)

    def _healthy(self, k: int) -> bool:
        raw = self.raw.get(k)
        return self.instances[k].healthy() and (raw is None or raw.healthy())

    def pick_index(self) -> int:
        """The healthy instance with the least outstanding work (its raw tensors' included); equals in
        turn. One whose worker is down is passed over while another can serve (its own requests then
        get its 503)."""
        self._turn += 1
        n = len(self.instances)
        up = [k for k in range(n) if self._healthy(k)] or list(range(n))
        return min(up, key=lambda k: (self._load(k), (k - self._turn) % n))

    def pick(self) -> Instance:
        return self.instances[self.pick_index()]

    def outcomes(self) -> tuple[int, int]:
        """(answered, failed) requests over every instance, since this version was loaded."""
        counts = [i.outcomes() for i in self.instances]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def busy(self) -> bool:
        return self.in_use > 0 or any(i.busy() for i in self._all())

    def apply(self, profile: BatchProfile) -> None:
        for instance in self.instances:
            if instance.device == profile.device:
                instance.apply(profile)

    async def infer(self, inputs: Sequence[Input], priority: int = NORMAL, truncate: bool = True) -> list[Output]:
        instance = self.pick()
        if not isinstance(instance.worker, DynamicBatcher):
            raise TypeError(f"model {self.name!r} generates text; it has no batch inference")
        instance.outstanding += len(inputs)
        try:
            return await instance.worker.submit(inputs, priority, truncate)
        finally:
            instance.outstanding -= len(inputs)

    @property
    def generator(self) -> GenerationEngine:
        """The engine the next request should go to (a request's sequences all go to one engine)."""
        engine = self.pick().worker
        if not isinstance(engine, GenerationEngine):
            raise TypeError(f"model {self.name!r} does not generate text")
        return engine

    async def infer_tensors(
        self, feeds: dict[str, npt.NDArray[Any]], max_rows: int, max_queue: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Raw tensors (/v2) through the chosen instance's tensor batcher, started on first use."""
        k = self.pick_index()
        raw = self.raw.get(k)
        if raw is None:
            text = self.instances[k]
            batcher = TensorBatcher(self.name, TensorModel(text.loaded.session), max_rows, max_queue)
            batcher.gave_up = text.gave_up
            batcher.start()
            raw = self.raw[k] = Instance(text.loaded, batcher, gave_up=text.gave_up)
        assert isinstance(raw.worker, TensorBatcher)
        raw.outstanding += 1
        try:
            return await raw.worker.submit(feeds)
        finally:
            raw.outstanding -= 1

    async def close(self) -> None:
        for instance in self._all():
            await instance.close()

    def _instance_status(self, k: int) -> dict[str, object]:
        """Instance k as /api/status shows it, its raw-tensor worker beside its own."""
        out = self.instances[k].status()
        raw = self.raw.get(k)
        if raw is not None:
            workers = dict(cast(dict[str, object], out["workers"])) | {raw.worker.role: raw.supervisor.status()}
            out |= raw.worker.report() | {"workers": workers, "healthy": self._healthy(k)}
        return out

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
            "instances": [self._instance_status(k) for k in range(len(self.instances))],
        }
        return out  # what the model's task adds (a causal LM's context) comes from the task: AppState.described
