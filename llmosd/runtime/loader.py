"""Turn a verified store manifest into a ready backend on the device that really loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmosd.runtime.adapters import Adapters, Adapting, Served
from llmosd.runtime.providers import Placement, ProviderSelector
from llmosd.store import Manifest, ManifestError, ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    placement: Placement
    backend: Served  # a Backend (the dynamic batcher serves it) or a TextGenerator (the generation engine)
    session: Any = None  # the ONNX session the backend runs (also served raw, over /v2)

    @property
    def name(self) -> str:
        return self.manifest.name


def load(
    store: ModelStore,
    manifest: Manifest,
    selector: ProviderSelector,
    adapters: Adapters,
    max_context: int = 0,
    target: str | None = None,
    threads: int | None = None,
    verify: bool = True,
    max_sequences: int = 16,
) -> LoadedModel:
    """Verify every file's digest, create the session and the task adapter, warm it up. Blocking.

    ``max_context`` caps a causal LM's context (0: the model's own); ``target`` and ``threads`` are
    placement's choice for this instance; ``verify`` False skips hashing (a further instance of a
    version just verified); ``max_sequences`` is the rows a causal LM's cache is laid out for.
    ``adapters``: the registered tasks' runtime adapters, by task."""
    adapter = adapters.get(manifest.task)
    if adapter is None:  # a plugin's model whose package is not installed (any more)
        known = ", ".join(sorted(adapters)) or "none"
        raise ManifestError(f"{manifest.ref}: no installed task serves {manifest.task!r} (installed: {known})")
    if verify:
        store.verify(manifest)
    data = {f.path: store.blob_path(f.digest) for f in manifest.files if f.role == "model-data"}
    session, placement = selector.create(store.file_path(manifest, "model"), manifest.devices, target, threads, data)
    sampling = store.sampling(manifest.name)  # `llmosd models set`, over the manifest's
    tokenizer = store.file_path(manifest, "tokenizer")
    adapting = Adapting(session, tokenizer, manifest.runtime, manifest.ref, max_context, max_sequences, sampling)
    backend = adapter(adapting)
    backend.warmup()
    log.info("loaded %s (%s, %s) on %s", manifest.ref, manifest.task, manifest.precision, placement.device)
    return LoadedModel(manifest, placement, backend, session)


@dataclass(frozen=True)
class Loader:
    """What the pool creates sessions with (Ollama's scheduler receives its ``newServerFn`` the same way):
    ``load`` on the provider choice built from the hardware probe, with the registered tasks' adapters.
    Tests hand the pool their own."""

    selector: ProviderSelector
    adapters: Adapters

    @property
    def threads(self) -> int:
        """The CPU's intra-op pool, which instances sharing the CPU split."""
        return self.selector.threads

    def __call__(
        self,
        store: ModelStore,
        manifest: Manifest,
        max_context: int = 0,
        target: str | None = None,
        threads: int | None = None,
        verify: bool = True,
        max_sequences: int = 16,
    ) -> LoadedModel:
        return load(store, manifest, self.selector, self.adapters, max_context, target, threads, verify, max_sequences)
