"""Turn a verified store manifest into a ready backend on the device that really loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.pooling import POOLINGS
from llmosd.runtime.providers import Placement, ProviderSelector
from llmosd.runtime.tasks import ClassifierModel, EmbeddingModel, RankingModel
from llmosd.runtime.tokenizer import TextTokenizer
from llmosd.store import Manifest, ManifestError, ModelStore
from llmosd.store.manifest import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    placement: Placement
    backend: EmbeddingModel | ClassifierModel | RankingModel | TextGenerator
    session: Any = None  # the ONNX session the backend runs (also served raw, over /v2)

    @property
    def name(self) -> str:
        return self.manifest.name


def _runtime_setting(manifest: Manifest, key: str) -> Any:
    try:
        return manifest.runtime[key]
    except KeyError:
        raise ManifestError(f"{manifest.ref}: manifest runtime settings lack {key!r}") from None


def load(
    store: ModelStore,
    manifest: Manifest,
    selector: ProviderSelector,
    max_context: int = 0,
    target: str | None = None,
    threads: int | None = None,
    verify: bool = True,
    max_sequences: int = 16,
) -> LoadedModel:
    """Verify every file's digest, create the session and the task adapter, warm it up. Blocking.

    ``max_context`` caps a causal LM's context (0: the model's own); ``target`` and ``threads`` are
    placement's choice for this instance; ``verify`` False skips hashing (a further instance of a
    version just verified); ``max_sequences`` is the rows a causal LM's cache is laid out for."""
    if manifest.task not in TASKS:
        raise ManifestError(f"{manifest.ref}: task {manifest.task!r} cannot be served")
    if verify:
        store.verify(manifest)
    data = {f.path: store.blob_path(f.digest) for f in manifest.files if f.role == "model-data"}
    session, placement = selector.create(store.file_path(manifest, "model"), manifest.devices, target, threads, data)
    backend = _adapter(store, manifest, session, max_context, max_sequences)
    backend.warmup()
    log.info("loaded %s (%s, %s) on %s", manifest.ref, manifest.task, manifest.precision, placement.device)
    return LoadedModel(manifest, placement, backend, session)


def _adapter(
    store: ModelStore, manifest: Manifest, session: Any, max_context: int, max_sequences: int
) -> EmbeddingModel | ClassifierModel | RankingModel | TextGenerator:
    tokenizer_path = store.file_path(manifest, "tokenizer")
    if manifest.task == "text-generation":
        generator = TextGenerator(session, tokenizer_path, manifest.runtime, max_context, max_sequences)
        generator.sampling_defaults |= store.sampling(manifest.name)  # `llmosd models set`, over the manifest's
        return generator
    tokenizer = TextTokenizer(tokenizer_path, int(_runtime_setting(manifest, "max_seq_length")))
    if manifest.task == "feature-extraction":
        pooling = _runtime_setting(manifest, "pooling")
        if pooling not in POOLINGS:
            raise ManifestError(f"{manifest.ref}: unknown pooling {pooling!r}")
        return EmbeddingModel(session, tokenizer, pooling, bool(_runtime_setting(manifest, "normalize")))
    if manifest.task == "text-ranking":
        return RankingModel(session, tokenizer, str(_runtime_setting(manifest, "score")))
    labels = [str(x) for x in _runtime_setting(manifest, "labels")]
    multi = manifest.runtime.get("problem_type") == "multi_label_classification"
    return ClassifierModel(session, tokenizer, labels, multi)


@dataclass(frozen=True)
class Loader:
    """What the pool creates sessions with (Ollama's scheduler receives its ``newServerFn`` the same way):
    ``load`` on the provider choice built from the hardware probe. Tests hand the pool their own."""

    selector: ProviderSelector

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
        return load(store, manifest, self.selector, max_context, target, threads, verify, max_sequences)
