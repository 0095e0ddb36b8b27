"""The fused graph's KV cache, written in place (SmolLM2 int4 from the session store, built by
onnxruntime-genai's model builder): rows are slots of one preallocated buffer, reused when rows leave,
and the pages a row used go back to the system when it leaves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from llmosd.runtime import ProviderSelector, load
from llmosd.runtime.fused_lm import FusedLM
from llmosd.runtime.generator import TextGenerator
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import SMOLLM2


@pytest.fixture(scope="module")
def smol(store_dir: Path) -> Iterator[TextGenerator]:
    store = ModelStore(store_dir)
    loaded = load(
        store, store.manifest(SMOLLM2), ProviderSelector("cpu", 2, False), discover().adapters(), max_sequences=4
    )
    assert isinstance(loaded.backend, TextGenerator)
    yield loaded.backend


def greedy(lm: FusedLM, rows: list[int], first: list[int], steps: int) -> list[list[int]]:
    out = [[t] for t in first]
    for _ in range(steps):
        logits = lm.decode(rows, [o[-1] for o in out])
        for o, t in zip(out, logits.argmax(-1), strict=True):
            o.append(int(t))
    return out


def test_rows_are_slots_written_in_place_and_a_leaving_rows_slot_is_reused(smol: TextGenerator) -> None:
    lm = smol.lm
    assert isinstance(lm, FusedLM) and lm.slots == 4
    prompts = [smol.encode(t, special=False) for t in ("The capital of France is", "def fib(n):", "Once upon a")]
    alone = []
    for p in prompts:
        logits, row = lm.prefill(p)
        alone.append(greedy(lm, [row], [int(logits.argmax())], 6)[0])
        lm.free(row)
    base = [a.ctypes.data for a in lm._arrays]
    rows, first = [], []
    for p in prompts:
        logits, row = lm.prefill(p)
        rows.append(row)
        first.append(int(logits.argmax()))
    assert rows == [0, 1, 2]
    together = greedy(lm, rows, first, 6)
    # rows at different lengths in one run: each as it runs alone (on AVX2 a lone row is decoded beside a
    # dummy row for it: llmosd.runtime.invariance)
    assert smol.invariance.exact, smol.invariance
    assert together == alone
    assert [a.ctypes.data for a in lm._arrays] == base  # the same memory throughout: nothing re-laid out
    lm.free(rows[1])  # the middle row leaves; its slot is a hole the others decode around
    tail = greedy(lm, [rows[0], rows[2]], [together[0][-1], together[2][-1]], 2)
    logits, joined = lm.prefill(prompts[1])
    assert joined == 1  # the freed slot is the next joiner's
    assert greedy(lm, [joined], [int(logits.argmax())], 6)[0] == alone[1]
    assert len(tail) == 2 and lm.lengths[rows[0]] == len(prompts[0]) + 8
    lm.reset()
    assert lm.lengths == [0, 0, 0, 0]


def test_a_row_in_use_but_not_decoded_keeps_its_cache(smol: TextGenerator) -> None:
    """The engine scores a prompt one position a run beside running rows it does not decode then (echo
    with logprobs): those rows run in place at their own length and must keep their cache (a one-position
    dummy wrote over their first position, and their next tokens changed)."""
    lm = smol.lm
    assert isinstance(lm, FusedLM)
    first, second = (smol.encode(t, special=False) for t in ("The capital of France is", "def fib(n):"))
    logits, row = lm.prefill(first)
    alone = greedy(lm, [row], [int(logits.argmax())], 6)[0]
    lm.free(row)
    logits, row = lm.prefill(first)
    other_logits, other = lm.prefill(second)
    assert (row, other) == (0, 1)
    greedy(lm, [other], [int(other_logits.argmax())], 4)  # row 0 waits: it is in use, not decoded
    assert lm.lengths[row] == len(first)
    assert greedy(lm, [row], [int(logits.argmax())], 6)[0] == alone
    lm.reset()


def test_a_long_rows_cache_pages_go_back_when_it_leaves(smol: TextGenerator) -> None:
    lm = smol.lm
    assert isinstance(lm, FusedLM)
    prompt = [1 + i % 500 for i in range(1500)]  # 1,500 positions x 46 KB (30 layers, fp32) = 69 MB
    process = psutil.Process()
    before = process.memory_info().rss
    _, row = lm.prefill(prompt)
    grown = process.memory_info().rss - before
    lm.free(row)
    after = process.memory_info().rss - before
    cache = len(prompt) * lm.bytes_per_token
    assert grown >= 0.8 * cache, (grown, cache)  # the pages exist once written...
    assert after <= grown - 0.8 * cache, (after, grown)  # ...and are returned when the row leaves


def test_a_run_computes_the_last_positions_logits_unless_it_keeps_more(smol: TextGenerator) -> None:
    """Prefill and decode pay for one position's LM head (the builder's pruned head); a scored prompt's
    run keeps every position's (``logits_to_keep``), each what a prefill ending there gives."""
    out = next(o for o in smol.lm.session.get_outputs() if o.name == "logits")  # type: ignore[attr-defined]
    assert out.shape[1] == "logits_to_keep"
    ids = smol.encode("hello there, how are you doing on this fine day", special=False)
    logits, row = smol.lm.prefill(ids)
    smol.lm.free(row)
    assert logits.shape == (smol.lm.vocab_size,) and np.isfinite(logits).all()
    row, cached = smol.lm.open(ids, reuse=False)
    try:
        kept = smol.lm.extend(row, ids, keep=len(ids))
    finally:
        smol.lm.free(row)
    assert cached == 0 and kept.shape == (len(ids), smol.lm.vocab_size)
    for end in (1, 4, len(ids)):
        alone, row = smol.lm.prefill(ids[:end])
        smol.lm.free(row)
        # int4's kernels for one row and for many round differently: close, the same choice
        assert np.abs(alone - kept[end - 1]).max() < 0.5 and alone.argmax() == kept[end - 1].argmax()
