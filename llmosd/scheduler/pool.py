"""The models being served, by name: loaded on demand, placed by the memory ledger (one or more
instances), unloaded when idle past keep_alive or least recently used when memory is short."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from llmosd.hardware import Hardware
from llmosd.hardware.autotune import BatchProfile
from llmosd.runtime import LoadedModel
from llmosd.runtime.generator import TextGenerator
from llmosd.scheduler.batcher import BatchPolicy, DynamicBatcher
from llmosd.scheduler.errors import ModelUnavailable
from llmosd.scheduler.generation import GenerationEngine, GenerationLimits
from llmosd.scheduler.placement import Ledger, PlacementError, candidates, need_bytes
from llmosd.scheduler.portable import check_portable
from llmosd.scheduler.served import Instance, ServedModel
from llmosd.scheduler.smoke import smoke_test
from llmosd.scheduler.tuning import Tuner
from llmosd.store import InvalidName, Manifest, ModelStore, NotFound, StoreError, check_name

log = logging.getLogger(__name__)


class SessionFactory(Protocol):
    """What the pool loads versions with (``llmosd.runtime.Loader`` in the daemon)."""

    @property
    def threads(self) -> int: ...

    def __call__(
        self,
        store: ModelStore,
        manifest: Manifest,
        max_context: int = 0,
        target: str | None = None,
        threads: int | None = None,
        verify: bool = True,
        max_sequences: int = 16,
    ) -> LoadedModel: ...


RETUNE_EVERY_S = 60.0  # how often instances measured badly are looked at again


class ModelPool:
    def __init__(
        self,
        store: ModelStore,
        hardware: Hardware,
        sessions: SessionFactory,
        policy: BatchPolicy,
        limits: GenerationLimits | None = None,
        max_context: int = 0,
        tuner: Tuner | None = None,
        instances: int = 1,
    ) -> None:
        """``hardware``: the probe's facts, from which the memory ledger decides where models fit;
        ``sessions``: what loads a version onto a device (built from the same facts)."""
        self.store = store
        self.hardware = hardware
        self.ledger = Ledger.from_hardware(hardware)
        self.sessions = sessions
        self.policy = policy
        self.limits = limits or GenerationLimits()
        self.max_context = max_context
        self.tuner = tuner
        self.instances = instances  # per GPU with room; on the CPU where no GPU has room
        self.pinned: set[str] = set()  # never unloaded to make room (the default models)
        self._tuning: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None  # re-tunes what was measured badly
        self._tune_lock = asyncio.Lock()
        self.watchers: list[Callable[[], None]] = []  # told (on the loop) when models load or unload
        self._retiring: set[asyncio.Task[None]] = set()  # replaced versions draining
        self.drain_s = 60.0  # how long a replaced version may finish its requests
        self._models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()
        self.failures: dict[str, str] = {}  # models unloaded because a worker kept dying, and why
        self.load_seconds: dict[str, float] = {}  # each model's last load (the router weighs it)
        self._giving_up: set[asyncio.Task[None]] = set()

    def set_policy(self, policy: BatchPolicy) -> None:
        """The configured batching limits changed (a reload): for models loaded from now on and for
        every instance serving now."""
        self.policy = policy
        for served in self._models.values():
            for instance in served.instances:
                instance.rebase(policy)

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
                name = served.name
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

    def serves(self, name: str) -> bool:
        return name in self._models

    def served(self) -> list[ServedModel]:
        return [self._models[n] for n in sorted(self._models)]

    async def load(self, name: str) -> ServedModel:
        """Load the active version of ``name`` (in threads: hashing and session creation block)."""
        async with self._lock:
            manifest = self.store.manifest(name)
            current = self._models.get(name)
            if current and current.manifest.version == manifest.version:
                return current
            started = time.monotonic()
            need, targets = await self._make_room(manifest)
            instances = await self._instances(manifest, need, targets)
            served = self._models[name] = ServedModel(instances)
            self.load_seconds[name] = time.monotonic() - started
            self.failures.pop(name, None)
        if current:  # new requests already go to the new version; the old one finishes what it holds
            log.info("activated %s; %s drains, then unloads", served.manifest.ref, current.manifest.ref)
            task = asyncio.create_task(self._retire(current))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        if self.tuner is not None and self.tuner.policy.enabled:
            self._start_tuning(served, self.tuner)
        self._notify()
        return served

    async def smoke_test(self, name: str, version: str) -> None:
        """Load a stored version that does not serve yet in a session of its own, placed and accounted by
        the ledger like any load (it may make room the same way), run it on a sample input, and unload
        it. Raises when any step fails; the version serving now is untouched either way."""
        manifest = self.store.manifest(name, version)
        key = f"{manifest.ref} (smoke test)"
        async with self._lock:
            need, targets = await self._make_room(manifest)
            target = targets[0]
            self.ledger.reserve(key, target, need)
            try:
                loaded = await asyncio.to_thread(
                    self.sessions, self.store, manifest, self.max_context, target, None, True, 1
                )
                await asyncio.to_thread(check_portable, loaded, self.hardware.cpu, self.store)
                await asyncio.to_thread(smoke_test, loaded)
            finally:
                self.ledger.release(key)

    async def _retire(self, old: ServedModel) -> None:
        """Unload a replaced version once no request holds it and its queues are empty."""
        deadline = time.monotonic() + self.drain_s
        while old.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if old.busy():
            log.warning("%s still busy after %.0f s of draining; closing it", old.manifest.ref, self.drain_s)
        await old.close()
        self.ledger.release(old.manifest.ref)
        log.info("unloaded %s (replaced)", old.manifest.ref)

    def _notify(self) -> None:
        for watcher in self.watchers:
            watcher()

    async def _instances(self, manifest: Manifest, need: int, targets: list[str]) -> list[Instance]:
        """One instance per target; instances sharing the CPU split its threads. Serves with those
        that loaded when a later one fails; raises (nothing reserved) when the first fails."""
        on_cpu = sum(1 for t in targets if t == "cpu")
        out: list[Instance] = []
        for i, target in enumerate(targets):
            threads = max(1, self.sessions.threads // on_cpu) if target == "cpu" and on_cpu > 1 else None
            try:
                loaded = await asyncio.to_thread(
                    self.sessions,
                    self.store,
                    manifest,
                    self.max_context,
                    target,
                    threads,
                    i == 0,
                    self.limits.max_sequences,
                )
                # validated on other CPU kernels: the gate's short form here, once (kept in the store)
                await asyncio.to_thread(check_portable, loaded, self.hardware.cpu, self.store)
            except Exception as exc:
                if not out:
                    self.ledger.release(manifest.ref)
                    raise
                log.warning(
                    "%s: instance %d of %d on %s did not load (%s)", manifest.ref, i + 1, len(targets), target, exc
                )
                break
            # accounted where it really landed (CUDA may have fallen back)
            self.ledger.reserve(manifest.ref, loaded.placement.device, need)
            out.append(self._serve(loaded))
        return out

    async def _make_room(self, manifest: Manifest) -> tuple[int, list[str]]:
        """Bytes one instance needs and the device of each instance, once devices have room: unloading
        least-recently-used unpinned models only where that is enough; PlacementError (nothing
        unloaded) when nothing can make room."""
        ledger = self.ledger
        need = need_bytes(manifest, self.limits.kv_cache_bytes)
        devices = candidates(manifest, self.hardware)
        try:
            return need, list(ledger.plan(manifest.ref, need, devices, self.instances))
        except PlacementError as refusal:
            for device in devices:
                held = ledger.used.get(device, {})
                victims = sorted(
                    (
                        s
                        for s in self._models.values()
                        if s.manifest.ref in held and s.name not in self.pinned | {manifest.name}
                    ),
                    key=lambda s: s.last_used,
                )
                if ledger.free(device) + sum(held[v.manifest.ref] for v in victims) < need:
                    continue  # even unloading all of them would not be enough here
                for victim in victims:
                    if ledger.free(device) >= need:
                        break
                    log.warning("unloading %s (least recently used) to make room for %s", victim.name, manifest.ref)
                    del self._models[victim.name]
                    ledger.release(victim.manifest.ref)
                    await victim.close()
                return need, list(ledger.plan(manifest.ref, need, [device], self.instances))
            raise refusal

    def _start_tuning(self, served: ServedModel, tuner: Tuner) -> None:
        """Serve at once at the default size; per device, apply a cached profile now or measure one
        instance in the background (one device after another) and apply it to its neighbours."""
        firsts = list({i.device: i for i in reversed(served.instances)}.values())[::-1]
        todo = []
        for instance in firsts:
            profile = tuner.cached(instance.loaded)
            if profile is not None:
                served.apply(profile)
            else:
                todo.append(instance)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_profiles(tuner))
        if not todo:
            return

        async def tune() -> None:
            for instance in todo:
                try:
                    async with self._tune_lock:  # one calibration at a time: parallel ones skew each other
                        interrupted = _interruption(instance)
                        profile = await asyncio.to_thread(tuner.tune, instance.loaded, interrupted)
                    served.apply(profile)
                except Exception:
                    log.exception("autotuning %s on %s failed; it keeps its default size", served.name, instance.device)

        task = asyncio.create_task(tune())
        self._tuning.add(task)
        task.add_done_callback(self._tuning.discard)

    async def _watch_profiles(self, tuner: Tuner, every_s: float = RETUNE_EVERY_S) -> None:
        """Every ``every_s``, measure again each idle instance whose profile was disturbed or whose runs
        have gone well faster than it predicts; a request arriving meanwhile voids the measurement."""
        while True:
            await asyncio.sleep(every_s)
            for served in self.served():
                for instance in {i.device: i for i in reversed(served.instances)}.values():
                    why = instance.retune_reason()
                    if why is None or instance.busy() or self._models.get(served.name) is not served:
                        continue
                    log.info("re-tuning %s on %s: %s", served.manifest.ref, instance.device, why)
                    if instance.profile is not None and instance.profile.disturbed:
                        instance.disturbed_retunes += 1  # 1, 2, 4 … minutes, at most an hour, between tries
                        wait = min(3600.0, every_s * 2 ** (instance.disturbed_retunes - 1))
                        instance.retune_after = time.monotonic() + wait
                    else:
                        instance.pace_retunes += 1
                    try:
                        async with self._tune_lock:
                            interrupted = _interruption(instance)
                            profile = await asyncio.to_thread(tuner.tune, instance.loaded, interrupted, 1)
                    except Exception:
                        log.exception("re-tuning %s on %s failed", served.name, instance.device)
                        continue
                    served.apply(profile)

    async def retune(self, name: str) -> BatchProfile:
        """Measure again now (``llmosd tune`` on a running daemon): every device the model is on;
        the first instance's profile is returned."""
        served = self.get(name)
        if self.tuner is None:
            raise TypeError(f"model {name!r} is not batch-tuned: the daemon has no tuner yet")
        profiles = []
        for instance in {i.device: i for i in reversed(served.instances)}.values():
            async with self._tune_lock:
                profile = await asyncio.to_thread(self.tuner.tune, instance.loaded)
            served.apply(profile)
            profiles.append(profile)
        return next(p for p in profiles if p.device == served.instances[0].device)

    def _serve(self, loaded: LoadedModel) -> Instance:
        def gave_up(reason: str) -> None:
            self._give_up(loaded.manifest.ref, loaded.name, reason)

        if isinstance(loaded.backend, TextGenerator):
            engine = GenerationEngine(loaded.name, loaded.backend, self.limits)
            engine.gave_up = gave_up
            engine.start()
            return Instance(loaded, engine, gave_up=gave_up)
        batcher: DynamicBatcher[Any] = DynamicBatcher(loaded.name, loaded.backend, self.policy)
        batcher.gave_up = gave_up
        batcher.start()
        return Instance(loaded, batcher, gave_up=gave_up)

    def _give_up(self, ref: str, name: str, reason: str) -> None:
        """A worker of ``ref`` died too often: unload it and say so (status, readiness). A later request
        or activation loads it afresh."""
        served = self._models.get(name)
        if served is None or served.manifest.ref != ref:
            return  # already replaced or unloaded
        self.failures[name] = reason
        log.error("unloading %s: %s", ref, reason)

        async def unload() -> None:
            if self._models.get(name) is served:
                await self.unload(name)

        task = asyncio.create_task(unload())
        self._giving_up.add(task)
        task.add_done_callback(self._giving_up.discard)

    async def unload(self, name: str) -> None:
        async with self._lock:
            served = self._models.pop(name, None)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded")
        self.ledger.release(served.manifest.ref)
        await served.close()
        self._notify()

    async def close(self) -> None:
        if self.tuner is not None:
            self.tuner.stopping.set()  # a calibration in its thread stops at its next run
        for task in [*self._tuning, *([self._watcher] if self._watcher else [])]:
            task.cancel()
        await asyncio.gather(*self._retiring, *self._giving_up, return_exceptions=True)
        for name in list(self._models):
            await self.unload(name)


def _interruption(instance: Instance) -> Callable[[], bool]:
    """Whether ``instance`` served or took requests since now: a calibration that shared the device with
    them measured them too (the load meter sees only other processes)."""
    seen = instance.outcomes()
    return lambda: instance.outcomes() != seen or instance.busy()
