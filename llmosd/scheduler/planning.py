"""Pure decisions of the batcher: how a window of sized items becomes padded batches."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_batch: int, max_tokens: int, max_waste: float) -> list[list[int]]:
    """Group item indices into batches, shortest first, so that little compute is spent on padding.

    Items are sorted by length; a batch grows while it stays within ``max_batch`` items,
    ``max_tokens`` padded tokens, and a padding share of at most ``max_waste``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in order:
        n = max(1, lengths[i])
        if group:
            padded = (len(group) + 1) * n  # sorted: the new item is the longest
            waste = 1.0 - (real + n) / padded
            if len(group) >= max_batch or padded > max_tokens or waste > max_waste:
                batches.append(group)
                group, real = [], 0
        group.append(i)
        real += n
    if group:
        batches.append(group)
    return batches


def retry_after_s(queued_items: int, items_per_s: float) -> int:
    """Seconds until the queue has likely drained, at the service rate measured so far (at least 1)."""
    if items_per_s <= 0:
        return 1
    return max(1, min(60, round(queued_items / items_per_s + 0.5)))
