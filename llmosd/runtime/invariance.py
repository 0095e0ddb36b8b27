"""Whether a row decodes the same alone and beside other rows, measured at load on the box that serves.

MLAS picks kernels by ISA and by shape. On AVX2 (without AVX-512), MatMulNBits runs a lone row (M = 1)
through another kernel than two rows or more, and the difference grows through the layers into
different tokens; rows in a batch of two or more are computed alike whatever their number or place
(bench/invariance.py measures each op of the fused graph, alone against in batches of 2 to 16). So a
fused decoder that finds its lone row differing decodes it beside a one-position dummy row instead,
through the path batches take: a greedy answer then never depends on what else runs, and a seed
reproduces a sample whatever runs beside it. Where even that differs (an ISA not seen yet), the model
says so in its status with the measured difference, and is served anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmosd.runtime.decoder import Decoder, FloatArray
from llmosd.runtime.fused_lm import FusedLM

ALONE, PADDED, SINGLE = "alone", "beside a dummy row", "alone (one row at a time: nothing runs beside it)"


@dataclass(frozen=True)
class Invariance:
    exact: bool  # a row's logits are bitwise those it gets beside another row
    lone_row: str  # how a row decoding alone runs: ALONE, PADDED, or SINGLE (a cache of one row)
    max_logit_diff: float  # the probe's largest difference as served (0.0 when exact)

    @property
    def min_rows(self) -> int:
        return 2 if self.lone_row == PADDED else 1

    def as_dict(self) -> dict[str, object]:
        return {"exact": self.exact, "lone_row": self.lone_row, "max_logit_diff": self.max_logit_diff}


def settle(lm: Decoder, a: Sequence[int], b: Sequence[int]) -> Invariance:
    """Decode ``a``'s next token alone and beside ``b`` (another length, so ``a`` is padded too); where
    they differ on a fused decoder, decode a lone row beside a dummy and compare again. Leaves ``lm``
    set to the way that holds, and its cache empty."""
    if lm.capacity < 2:  # a smoke test's cache, or max_sequences = 1: the promise holds by itself
        _step(lm, a, None)
        return Invariance(True, SINGLE, 0.0)
    together = _step(lm, a, b)
    alone = _step(lm, a, None)
    if np.array_equal(alone, together):
        return Invariance(True, ALONE, 0.0)
    if isinstance(lm, FusedLM):
        lm.min_rows = 2
        padded = _step(lm, a, None)
        if np.array_equal(padded, together):
            return Invariance(True, PADDED, 0.0)
        lm.min_rows = 1  # no better for it: the faster way
    return Invariance(False, ALONE, float(np.abs(alone - together).max()))


def _step(lm: Decoder, a: Sequence[int], b: Sequence[int] | None) -> FloatArray:
    """``a``'s logits one step after its prompt, with ``b`` decoded beside it if given."""
    rows: list[int] = []
    try:
        logits, row = lm.prefill(a)
        rows.append(row)
        tokens = [int(logits.argmax())]
        if b is not None:
            other, second = lm.prefill(b)
            rows.append(second)
            tokens.append(int(other.argmax()))
        out: FloatArray = lm.decode(rows, tokens)[0].copy()
        return out
    finally:
        for row in rows:
            lm.free(row)
