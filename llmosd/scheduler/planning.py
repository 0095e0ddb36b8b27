"""Pure decisions of the batcher: which pending items run together next."""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def partition(lengths: Sequence[int], max_batch: int, max_tokens: int, run_cost_tokens: int) -> list[int]:
    """Cheapest split of length-sorted items into contiguous batches; returns the batch start indices.

    A run costs ``run_cost_tokens`` (its fixed overhead, in tokens of work) plus every padded token,
    ``n * longest``. Exact dynamic programming, O(items * max_batch): a few hundred items at most.
    """
    best = [0.0] + [float("inf")] * len(lengths)  # best[j]: cheapest plan for the j shortest items
    cut = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        longest = max(1, lengths[j - 1])
        for i in range(max(0, j - max_batch), j):
            n = j - i
            if n > 1 and n * longest > max_tokens:
                continue
            cost = best[i] + run_cost_tokens + n * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    starts = []
    j = len(lengths)
    while j > 0:
        j = cut[j]
        starts.append(j)
    return starts[::-1]


def choose_batch(
    lengths: Sequence[int], oldest: int, max_batch: int, max_tokens: int, run_cost_tokens: int
) -> tuple[int, int]:
    """The next batch to run, as a slice ``[i, j)`` of the pending items sorted by length.

    It is the batch of the cheapest partition that holds ``oldest`` (the item waiting longest): every
    run is one a globally good plan would make, and nothing starves.
    """
    if not 0 <= oldest < len(lengths):
        raise ValueError("oldest must index a pending item")
    starts = [*partition(lengths, max_batch, max_tokens, run_cost_tokens), len(lengths)]
    for i, j in itertools.pairwise(starts):
        if i <= oldest < j:
            return i, j
    raise AssertionError("a partition covers every item")


def retry_after_s(queued_items: int, items_per_s: float) -> int:
    """Seconds until the queue has likely drained, at the service rate measured so far (at least 1)."""
    if items_per_s <= 0:
        return 1
    return max(1, min(60, round(queued_items / items_per_s + 0.5)))
