"""The runtime's seam for tasks: what a task's adapter is handed to turn a session into a backend.

The loader knows no task by name: it looks the manifest's task up in the adapters it was given (the
task registry's, ``llmosd.tasks``) and calls it with an ``Adapting``. An adapter returns a ``Backend``
(prepare / run / warmup / release: the dynamic batcher serves it) or a ``TextGenerator`` (the
generation engine serves it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmosd.runtime.backend import Backend
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.tokenizer import TextTokenizer
from llmosd.store.manifest import ManifestError

Served = Backend[Any] | TextGenerator


@dataclass(frozen=True)
class Adapting:
    """One model version's session and settings, as an adapter receives them."""

    session: Any  # the ONNX Runtime session, created on the device placement chose
    tokenizer_path: Path
    runtime: Mapping[str, Any]  # the manifest's runtime settings (what the export's settings hook wrote)
    ref: str = ""  # name:version, for messages
    max_context: int = 0  # causal LMs: the context cap (0: the model's own)
    max_sequences: int = 16  # causal LMs: the rows the cache is laid out for
    sampling: Mapping[str, float | int] = field(default_factory=dict)  # `llmosd models set`, over the manifest's

    def setting(self, key: str) -> Any:
        """A runtime setting the task cannot do without (a manifest that lacks it is refused)."""
        try:
            return self.runtime[key]
        except KeyError:
            raise ManifestError(f"{self.ref}: manifest runtime settings lack {key!r}") from None

    def tokenizer(self) -> TextTokenizer:
        """The encoder tokenizer, cut at the model's ``max_seq_length``."""
        return TextTokenizer(self.tokenizer_path, int(self.setting("max_seq_length")))


Adapter = Callable[[Adapting], Served]
Adapters = Mapping[str, Adapter]
