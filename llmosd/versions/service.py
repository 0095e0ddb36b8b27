"""A model version's life, in one place below the API: pull (registries opened through one factory,
signatures checked), smoke test through the pool (placed and accounted by its ledger), activate (the store's
``active`` pointer, then the pool: new requests go to the new version, the old one drains), roll back.
The HTTP routes, the registry sync and the CLI all call it; without a pool (the CLI with no daemon
running) activation only moves the pointer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from llmosd.registry import PullResult, Reference, pull
from llmosd.registry.access import Registries
from llmosd.registry.peers import Peer
from llmosd.registry.transfer import LayerProgress
from llmosd.scheduler import GenerationRequest, ModelPool, SamplingParams
from llmosd.scheduler.portable import validated_elsewhere
from llmosd.store import Manifest, ModelStore, NotFound, StoreError


class NoOlderVersion(StoreError):
    """A rollback with nothing to roll back to."""


@dataclass(frozen=True)
class Activated:
    manifest: Manifest  # the version active now
    previous: str | None  # the version active before
    serving: bool  # whether the pool serves it now


class ModelVersions:
    def __init__(
        self,
        store: ModelStore,
        pool: ModelPool | None,
        registries: Callable[[], Registries],
        peers: Callable[[], list[Peer]] = list,
    ) -> None:
        """``registries`` and ``peers`` are asked at every pull: a reload may change either."""
        self.store, self.pool, self.registries, self.peers = store, pool, registries, peers

    async def pull(
        self,
        ref: Reference,
        *,
        name: str | None = None,
        activate: bool = True,
        progress: LayerProgress | None = None,
        insecure: bool = False,
        signed: bool = True,
    ) -> tuple[PullResult, bool]:
        """Pull ``ref`` into the store (resumable, verified, atomic); with ``activate`` it becomes the
        active version and serves at once where the model was served. ``signed`` False skips the
        signature policy (the CLI's --allow-unsigned). (result, serving)."""
        registries = self.registries()
        trust = registries.trust(ref.host) if signed else None
        async with aiohttp.ClientSession() as session:
            registry = registries.open(ref.host, session, insecure)
            result = await pull(
                self.store,
                ref,
                registry,
                name=name,
                activate=activate,
                progress=progress,
                trust=trust,
                peers=self.peers(),
            )
        serving = activate and await self.serve(result.manifest.name)
        return result, serving

    async def serve(self, name: str) -> bool:
        """Serve the newly active version where the model is being served (or is one of the box's own);
        whether it does."""
        if self.pool is None:
            return False
        if name in {s.name for s in self.pool.served()} or name in self.pool.pinned:
            await self.pool.load(name)
            return True
        return False

    async def load(self, name: str) -> None:
        """Serve the active version of ``name`` now, whether or not it was served (the sync's activation)."""
        if self.pool is not None:
            await self.pool.load(name)

    async def activate(self, name: str, version: str) -> Activated:
        if version not in self.store.versions(name):
            raise NotFound(f"model {name}:{version} is not in the store")
        manifest = self.store.manifest(name, version)
        if self.pool is not None and validated_elsewhere(manifest, self.pool.hardware.cpu):
            # validated on other CPU kernels: the gate's short form here first (raises NotPortable,
            # and the active version stays)
            await self.pool.smoke_test(name, version)
        previous = self.store.active_version(name)
        await asyncio.to_thread(self.store.activate, name, version)
        serving = await self.serve(name)
        return Activated(self.store.manifest(name), previous, serving)

    async def rollback(self, name: str) -> Activated:
        """Activate the newest version older than the active one."""
        if not self.store.versions(name):
            raise NotFound(f"model {name!r} is not in the store")
        active = self.store.active_version(name)
        previous = self.store.previous_version(name)
        if previous is None:
            raise NoOlderVersion(f"model {name!r} has no version older than {active} to roll back to")
        await asyncio.to_thread(self.store.activate, name, previous)
        serving = await self.serve(name)
        return Activated(self.store.manifest(name), active, serving)

    async def smoke_test(self, name: str, version: str) -> None:
        """Run a stored version that does not serve yet on a sample input, through the pool."""
        if self.pool is None:
            raise RuntimeError("a smoke test needs the daemon's pool")
        await self.pool.smoke_test(name, version)

    async def probe(self, name: str) -> None:
        """One request through the version serving now (raises on failure): the sync's health probe."""
        if self.pool is None:
            raise RuntimeError("a probe needs the daemon's pool")
        served = await self.pool.acquire(name)
        try:
            if served.generates:
                request = GenerationRequest((1,), SamplingParams(temperature=0.0), max_tokens=1, ignore_eos=True)
                await served.generator.submit(request).text()
            else:
                await served.infer(["health probe"])
        finally:
            self.pool.release(served)

    def outcomes(self, name: str) -> tuple[int, int] | None:
        """Real requests the served version answered and failed (None when it is not being served)."""
        if self.pool is None:
            return None
        served = {s.name: s for s in self.pool.served()}.get(name)
        return served.outcomes() if served is not None else None
