"""Turn a verified store manifest into a ready backend on the device that really loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmosd.runtime.pooling import POOLINGS
from llmosd.runtime.providers import Placement, ProviderSelector
from llmosd.runtime.tasks import ClassifierModel, EmbeddingModel
from llmosd.runtime.tokenizer import TextTokenizer
from llmosd.store import Manifest, ManifestError, ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    placement: Placement
    backend: EmbeddingModel | ClassifierModel

    @property
    def name(self) -> str:
        return self.manifest.name


def _runtime_setting(manifest: Manifest, key: str) -> Any:
    try:
        return manifest.runtime[key]
    except KeyError:
        raise ManifestError(f"{manifest.ref}: manifest runtime settings lack {key!r}") from None


def load(store: ModelStore, manifest: Manifest, selector: ProviderSelector) -> LoadedModel:
    """Verify every file's digest, create the session and the task adapter, warm it up. Blocking."""
    store.verify(manifest)
    max_len = int(_runtime_setting(manifest, "max_seq_length"))
    tokenizer = TextTokenizer(store.file_path(manifest, "tokenizer"), max_len)
    session, placement = selector.create(store.file_path(manifest, "model"), manifest.devices)
    backend: EmbeddingModel | ClassifierModel
    if manifest.task == "feature-extraction":
        pooling = _runtime_setting(manifest, "pooling")
        if pooling not in POOLINGS:
            raise ManifestError(f"{manifest.ref}: unknown pooling {pooling!r}")
        backend = EmbeddingModel(session, tokenizer, pooling, bool(_runtime_setting(manifest, "normalize")))
    elif manifest.task == "text-classification":
        labels = [str(x) for x in _runtime_setting(manifest, "labels")]
        multi = manifest.runtime.get("problem_type") == "multi_label_classification"
        backend = ClassifierModel(session, tokenizer, labels, multi)
    else:
        raise ManifestError(f"{manifest.ref}: task {manifest.task!r} cannot be served yet")
    backend.warmup()
    log.info("loaded %s (%s, %s) on %s", manifest.ref, manifest.task, manifest.precision, placement.device)
    return LoadedModel(manifest, placement, backend)
