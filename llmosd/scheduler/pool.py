"""The models being served: one loaded runtime and one batcher per model name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmosd.runtime import LoadedModel, Output, ProviderSelector, load
from llmosd.scheduler.batcher import BatchPolicy, DynamicBatcher
from llmosd.store import ModelStore, NotFound

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    loaded: LoadedModel
    batcher: DynamicBatcher[Any]

    async def infer(self, inputs: Sequence[str]) -> list[Output]:
        return await self.batcher.submit(inputs)


class ModelPool:
    def __init__(self, store: ModelStore, selector: ProviderSelector, policy: BatchPolicy) -> None:
        self.store = store
        self.selector = selector
        self.policy = policy
        self._models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not loaded") from None

    def served(self) -> list[ServedModel]:
        return [self._models[n] for n in sorted(self._models)]

    async def load(self, name: str) -> ServedModel:
        """Load the active version of ``name`` (in a thread: hashing and session creation block)."""
        async with self._lock:
            manifest = self.store.manifest(name)
            current = self._models.get(name)
            if current and current.loaded.manifest.version == manifest.version:
                return current
            loaded = await asyncio.to_thread(load, self.store, manifest, self.selector)
            batcher: DynamicBatcher[Any] = DynamicBatcher(name, loaded.backend, self.policy)
            batcher.start()
            self._models[name] = ServedModel(loaded, batcher)
        if current:
            await current.batcher.close()
        return self._models[name]

    async def unload(self, name: str) -> None:
        async with self._lock:
            served = self._models.pop(name, None)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded")
        await served.batcher.close()

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "name": s.loaded.name,
                "version": s.loaded.manifest.version,
                "task": s.loaded.manifest.task,
                "precision": s.loaded.manifest.precision,
                "device": s.loaded.placement.device,
                "providers": list(s.loaded.placement.providers),
                "note": s.loaded.placement.note,
                "queued": s.batcher.queued,
                "batcher": s.batcher.stats.as_dict(),
            }
            for s in self.served()
        ]
