"""Prompt (prefix) caching: the KV of prompts' leading blocks, kept so that a request that starts the
same way (a system prompt, few-shot examples, a conversation grown by one message) copies them into its
row instead of prefilling them again.

Blocks are ``BLOCK`` positions; a block is keyed by a digest of every token id up to its end (vLLM's
chained block hashes), so a hit is always a whole prefix. Entries are host copies, one array per cache
tensor; they leave least recently used first whenever the engine's budget (what the running rows leave
free of ``kv_cache_mb``) shrinks, or a new block would not fit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

BLOCK = 32
Block = list[npt.NDArray[np.floating]]  # one [kv_heads, BLOCK, head_dim] array per past tensor


@dataclass
class PrefixStats:
    queries: int = 0  # prompts looked up
    hits: int = 0  # prompts that found at least one block
    hit_tokens: int = 0  # positions copied instead of prefilled
    query_tokens: int = 0  # prompt positions looked up


def _digests(ids: Sequence[int], blocks: int) -> list[bytes]:
    h = hashlib.blake2b(digest_size=16)
    out = []
    array = np.asarray(ids[: blocks * BLOCK], dtype=np.int32)
    for b in range(blocks):
        h.update(array[b * BLOCK : (b + 1) * BLOCK].tobytes())
        out.append(h.copy().digest())
    return out


class PrefixCache:
    def __init__(self, bytes_per_token: int) -> None:
        self.block_bytes = bytes_per_token * BLOCK
        self.limit = 0  # bytes it may hold now: the engine sets it before each admission
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.stats = PrefixStats()

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def match(self, ids: Sequence[int]) -> list[Block]:
        """The cached blocks the prompt starts with, leaving at least one token to run (its logits)."""
        self.stats.queries += 1
        self.stats.query_tokens += len(ids)
        found: list[Block] = []
        keys = _digests(ids, (len(ids) - 1) // BLOCK)
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        for key in reversed(keys[: len(found)]):  # the first blocks most recent: they serve the most prompts
            self._blocks.move_to_end(key)
        if found:
            self.stats.hits += 1
            self.stats.hit_tokens += len(found) * BLOCK
        return found

    def store(self, ids: Sequence[int], read: Callable[[int], Block]) -> None:
        """Keep the prompt's whole blocks not kept yet; ``read(b)`` copies block ``b`` out of the row."""
        for b, key in enumerate(_digests(ids, len(ids) // BLOCK)):
            if key in self._blocks:
                continue
            self.shrink(self.limit - self.block_bytes)
            if self.bytes + self.block_bytes > self.limit:
                return
            self._blocks[key] = read(b)

    def shrink(self, limit: int) -> None:
        """Drop least recently used blocks until at most ``limit`` bytes are held."""
        while self._blocks and self.bytes > max(limit, 0):
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
