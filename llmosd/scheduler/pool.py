"""The models being served: one loaded runtime per model name, behind a batcher (encoders) or a
continuous-batching generation engine (causal LMs)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmosd.hardware import Hardware
from llmosd.hardware.autotune import BatchProfile
from llmosd.runtime import LoadedModel, Output, ProviderSelector, load
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.tensors import TensorModel
from llmosd.scheduler.batcher import BatchPolicy, DynamicBatcher
from llmosd.scheduler.errors import ModelUnavailable
from llmosd.scheduler.generation import GenerationEngine, GenerationLimits
from llmosd.scheduler.placement import Ledger, PlacementError, candidates, need_bytes
from llmosd.scheduler.priority import NORMAL
from llmosd.scheduler.tensor_batcher import TensorBatcher
from llmosd.scheduler.tuning import Tuner
from llmosd.store import InvalidName, Manifest, ModelStore, NotFound, StoreError, check_name

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    loaded: LoadedModel
    batcher: DynamicBatcher[Any] | None = None
    engine: GenerationEngine | None = None
    tensors: TensorBatcher | None = None  # raw tensors (/v2), started on first use
    profile: BatchProfile | None = None  # the autotuned batch size, once known
    last_used: float = field(default_factory=time.monotonic)  # for least-recently-used unloading
    in_use: int = 0  # requests holding it (between acquire and release): never unloaded meanwhile
    keep_alive_s: float | None = None  # idle time before unloading; None: the pool's default

    def busy(self) -> bool:
        queued = self.batcher is not None and self.batcher.queued > 0
        generating = self.engine is not None and (self.engine.stats.running + self.engine.stats.waiting) > 0
        return self.in_use > 0 or queued or generating

    def apply(self, profile: BatchProfile) -> None:
        """Switch the batcher to the tuned size (the worker reads its policy at every step)."""
        self.profile = profile
        if self.batcher is not None:
            self.batcher.policy = dataclasses.replace(self.batcher.policy, max_batch=profile.chosen)
        if self.engine is not None:  # rows decoded together (the engine reads its limits at every step)
            self.engine.limits = dataclasses.replace(self.engine.limits, max_sequences=profile.chosen)

    def tensor_batcher(self, max_rows: int, max_queue: int) -> TensorBatcher:
        """The model's raw-tensor batcher, started on first use (on the event loop)."""
        if self.tensors is None:
            self.tensors = TensorBatcher(self.loaded.name, TensorModel(self.loaded.session), max_rows, max_queue)
            self.tensors.start()
        return self.tensors

    async def infer(self, inputs: Sequence[str], priority: int = NORMAL) -> list[Output]:
        if self.batcher is None:
            raise TypeError(f"model {self.loaded.name!r} generates text; it has no batch inference")
        return await self.batcher.submit(inputs, priority)

    @property
    def generator(self) -> GenerationEngine:
        if self.engine is None:
            raise TypeError(f"model {self.loaded.name!r} does not generate text")
        return self.engine

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.engine is not None:
            await self.engine.close()
        if self.tensors is not None:
            await self.tensors.close()

    def status(self) -> dict[str, object]:
        m = self.loaded.manifest
        out: dict[str, object] = {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "precision": m.precision,
            "device": self.loaded.placement.device,
            "providers": list(self.loaded.placement.providers),
            "note": self.loaded.placement.note,
        }
        if self.batcher is not None:
            out |= {
                "max_batch": self.batcher.policy.max_batch,
                "tuned": self.profile.reason if self.profile else None,
                "queued": self.batcher.queued,
                "queued_by_priority": self.batcher.queued_by_priority(),
                "batcher": self.batcher.stats.as_dict(),
            }
        if self.engine is not None:
            backend = self.engine.model
            out |= {
                "max_sequences": self.engine.limits.max_sequences,
                "tuned": self.profile.reason if self.profile else None,
                "queued": self.engine.stats.waiting,
                "queued_by_priority": self.engine.stats.waiting_by_priority,
                "context_length": backend.context_length,
                "kv_bytes_per_token": backend.lm.layout.bytes_per_token,
                "generation": self.engine.stats.as_dict(),
            }
        if self.tensors is not None:
            out["tensors"] = self.tensors.stats.as_dict()
        return out


class ModelPool:
    def __init__(
        self,
        store: ModelStore,
        selector: ProviderSelector,
        policy: BatchPolicy,
        limits: GenerationLimits | None = None,
        max_context: int = 0,
        tuner: Tuner | None = None,
    ) -> None:
        self.store = store
        self.selector = selector
        self.policy = policy
        self.limits = limits or GenerationLimits()
        self.max_context = max_context
        self.tuner = tuner  # set by the daemon once the hardware is probed
        self.hardware: Hardware | None = None  # with it, a memory ledger decides where models fit
        self.ledger: Ledger | None = None
        self.pinned: set[str] = set()  # never unloaded to make room (the default models)
        self._tuning: set[asyncio.Task[None]] = set()
        self._models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()

    def use_hardware(self, hardware: Hardware, tuner: Tuner | None) -> None:
        self.hardware = hardware
        self.ledger = Ledger.from_hardware(hardware)
        self.tuner = tuner

    async def acquire(self, name: str, keep_alive_s: float | None = None) -> ServedModel:
        """The served model, loaded now if the store has it (Ollama's load on first request); held
        until ``release`` so that keep_alive cannot unload it mid-request."""
        served = self._models.get(name)
        if served is None:
            try:
                known = bool(self.store.active_version(check_name(name)))
            except (InvalidName, StoreError):
                known = False
            if not known:
                raise NotFound(f"model {name!r} is not loaded, and the store has no such model")
            try:
                served = await self.load(name)
            except PlacementError:
                raise
            except Exception as exc:  # the reason goes to the client; the daemon serves on
                log.error("cannot load %s on demand: %s", name, exc)
                raise ModelUnavailable(f"model {name!r} cannot be loaded: {exc}") from exc
        served.in_use += 1
        served.last_used = time.monotonic()
        if keep_alive_s is not None:
            served.keep_alive_s = keep_alive_s
        return served

    def release(self, served: ServedModel) -> None:
        served.in_use -= 1
        served.last_used = time.monotonic()

    async def async_keep_alive(self, default_s: float, every_s: float = 1.0) -> None:
        """Unload unpinned models idle past their keep_alive (negative: forever). Runs until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for served in list(self._models.values()):
                limit = default_s if served.keep_alive_s is None else served.keep_alive_s
                name = served.loaded.name
                if name in self.pinned or limit < 0 or served.busy() or now - served.last_used < limit:
                    continue
                if self._models.get(name) is served:
                    log.info("unloading %s: idle for %.0f s (keep_alive %g s)", name, now - served.last_used, limit)
                    await self.unload(name)

    def get(self, name: str) -> ServedModel:
        try:
            served = self._models[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not loaded") from None
        served.last_used = time.monotonic()
        return served

    def served(self) -> list[ServedModel]:
        return [self._models[n] for n in sorted(self._models)]

    async def load(self, name: str) -> ServedModel:
        """Load the active version of ``name`` (in a thread: hashing and session creation block)."""
        async with self._lock:
            manifest = self.store.manifest(name)
            current = self._models.get(name)
            if current and current.loaded.manifest.version == manifest.version:
                return current
            need = await self._make_room(manifest)
            loaded = await asyncio.to_thread(load, self.store, manifest, self.selector, self.max_context)
            if self.ledger is not None:  # accounted where it really landed (CUDA may have fallen back)
                self.ledger.reserve(manifest.ref, loaded.placement.device, need)
            served = self._models[name] = self._serve(loaded)
        if current:
            if self.ledger is not None:
                self.ledger.release(current.loaded.manifest.ref)
            await current.close()
        if self.tuner is not None and self.tuner.policy.enabled:
            self._start_tuning(served, self.tuner)
        return served

    async def _make_room(self, manifest: Manifest) -> int:
        """Bytes the model needs, once a device has them: unloading least-recently-used unpinned models
        only where that is enough; PlacementError (nothing unloaded) when nothing can make room."""
        if self.ledger is None or self.hardware is None:
            return 0
        ledger = self.ledger
        need = need_bytes(manifest, self.limits.kv_cache_bytes)
        devices = candidates(manifest, self.hardware)
        try:
            ledger.place(manifest.ref, need, devices)
            return need
        except PlacementError as refusal:
            for device in devices:
                held = ledger.used.get(device, {})
                victims = sorted(
                    (
                        s
                        for s in self._models.values()
                        if s.loaded.manifest.ref in held and s.loaded.name not in self.pinned | {manifest.name}
                    ),
                    key=lambda s: s.last_used,
                )
                if ledger.free(device) + sum(held[v.loaded.manifest.ref] for v in victims) < need:
                    continue  # even unloading all of them would not be enough here
                for victim in victims:
                    if ledger.free(device) >= need:
                        break
                    log.warning(
                        "unloading %s (least recently used) to make room for %s", victim.loaded.name, manifest.ref
                    )
                    del self._models[victim.loaded.name]
                    ledger.release(victim.loaded.manifest.ref)
                    await victim.close()
                return need
            raise refusal

    def _start_tuning(self, served: ServedModel, tuner: Tuner) -> None:
        """Serve at once at the default size; apply a cached profile now, or measure in the background."""
        profile = tuner.cached(served.loaded)
        if profile is not None:
            served.apply(profile)
            return

        async def tune() -> None:
            try:
                served.apply(await asyncio.to_thread(tuner.tune, served.loaded))
            except Exception:
                log.exception("autotuning %s failed; it keeps its default batch size", served.loaded.name)

        task = asyncio.create_task(tune())
        self._tuning.add(task)
        task.add_done_callback(self._tuning.discard)

    async def retune(self, name: str) -> BatchProfile:
        """Measure again now (``llmosd tune`` on a running daemon)."""
        served = self.get(name)
        if self.tuner is None:
            raise TypeError(f"model {name!r} is not batch-tuned: the daemon has no tuner yet")
        profile = await asyncio.to_thread(self.tuner.tune, served.loaded)
        served.apply(profile)
        return profile

    def _serve(self, loaded: LoadedModel) -> ServedModel:
        if isinstance(loaded.backend, TextGenerator):
            engine = GenerationEngine(loaded.name, loaded.backend, self.limits)
            engine.start()
            return ServedModel(loaded, engine=engine)
        batcher: DynamicBatcher[Any] = DynamicBatcher(loaded.name, loaded.backend, self.policy)
        batcher.start()
        return ServedModel(loaded, batcher=batcher)

    async def unload(self, name: str) -> None:
        async with self._lock:
            served = self._models.pop(name, None)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded")
        if self.ledger is not None:
            self.ledger.release(served.loaded.manifest.ref)
        await served.close()

    async def close(self) -> None:
        for task in list(self._tuning):  # a calibration in its thread finishes on its own
            task.cancel()
        for name in list(self._models):
            await self.unload(name)

    def status(self) -> list[dict[str, object]]:
        return [s.status() for s in self.served()]
