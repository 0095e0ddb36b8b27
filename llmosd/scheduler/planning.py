"""Pure decisions of the batcher: which pending items run together next."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

RunCost = Callable[[int, int], float]  # (inputs, longest) -> the run's cost, in any one unit


def token_cost(run_cost_tokens: float) -> RunCost:
    """The untuned model: a fixed overhead in tokens of work plus every padded token."""
    return lambda n, longest: run_cost_tokens + n * longest


def partition(lengths: Sequence[int], max_batch: int, max_tokens: int, cost: RunCost) -> list[int]:
    """Cheapest split of length-sorted items into contiguous batches; returns the batch start indices.

    ``cost(n, longest)`` prices one run of n items padded to the longest (the autotune profile's
    measured model, or ``token_cost``); a run of several may pad to ``max_tokens`` at most. Exact
    dynamic programming, O(items * max_batch): a few hundred items at most.
    """
    best = [0.0] + [float("inf")] * len(lengths)  # best[j]: cheapest plan for the j shortest items
    cut = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        longest = max(1, lengths[j - 1])
        for i in range(max(0, j - max_batch), j):
            n = j - i
            if n > 1 and n * longest > max_tokens:
                continue
            total = best[i] + cost(n, longest)
            if total < best[j]:
                best[j], cut[j] = total, i
    starts = []
    j = len(lengths)
    while j > 0:
        j = cut[j]
        starts.append(j)
    return starts[::-1]


def choose_batch(
    lengths: Sequence[int], oldest: int, max_batch: int, max_tokens: int, cost: RunCost
) -> tuple[int, int]:
    """The next batch to run, as a slice ``[i, j)`` of the pending items sorted by length.

    It is the batch of the cheapest partition that holds ``oldest`` (the item waiting longest): every
    run is one a globally good plan would make, and nothing starves.
    """
    if not 0 <= oldest < len(lengths):
        raise ValueError("oldest must index a pending item")
    starts = [*partition(lengths, max_batch, max_tokens, cost), len(lengths)]
    for i, j in itertools.pairwise(starts):
        if i <= oldest < j:
            return i, j
    raise AssertionError("a partition covers every item")


def retry_after_s(queued_items: int, items_per_s: float) -> int:
    """Seconds until the queue has likely drained, at the service rate measured so far (at least 1)."""
    if items_per_s <= 0:
        return 1
    return max(1, min(60, round(queued_items / items_per_s + 0.5)))
