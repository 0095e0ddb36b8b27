"""A version's smoke test: run it on a sample input before it may serve."""

from __future__ import annotations

import numpy as np

from llmosd.runtime import LoadedModel
from llmosd.runtime.generator import TextGenerator


def smoke_test(loaded: LoadedModel) -> None:
    """Run the loaded version on a sample input; raise unless every output is finite."""
    backend = loaded.backend
    if isinstance(backend, TextGenerator):
        logits, row = backend.lm.prefill(backend.encode("smoke test", special=False) or [0])
        backend.lm.free(row)
        values = np.asarray(logits)
    else:
        values = np.stack([o.values for o in backend.run(backend.prepare(["smoke test", "a second input"]))])
    if not np.all(np.isfinite(values)):
        raise ValueError("the model's outputs on a sample input are not finite")
