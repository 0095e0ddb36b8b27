"""The contract between the generation engine and a causal LM's cache: rows, not arrays.

A row is a sequence's place in the model's KV cache. ``prefill`` runs a prompt into a new row and
returns the logits of its last position (``open`` + ``extend`` + ``remember``, which the engine calls
itself to run a prompt in chunks between decode steps); ``decode`` runs one step for the given rows (in that order)
and returns one row of logits each; ``free`` gives a finished row's place back. How the cache is laid
out (one right-aligned batch that is rebuilt when rows join or leave, or preallocated slots written in
place) is the implementation's business. Called from the engine's worker thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from llmosd.runtime.prefix_cache import PrefixCache

FloatArray = npt.NDArray[np.float32]


class Decoder(Protocol):
    prefix: PrefixCache | None  # prompts' leading blocks (None: this layout cannot reuse them)
    vocab_size: int
    bytes_per_token: int  # cache bytes of one position of one row, all layers, keys and values
    dtype: type[np.floating[Any]]
    capacity: int  # rows the cache can hold at once
    chunks: bool  # a row's prompt can run in pieces (``extend`` onto positions already in the row)
    logits_kept: int  # positions whose logits one ``extend`` can return (1: the last only)

    def prefill(self, ids: Sequence[int]) -> tuple[FloatArray, int]:
        """Run a prompt into a new row; return its last position's logits and the row."""
        ...

    def open(self, ids: Sequence[int], reuse: bool = True) -> tuple[int, int]:
        """A new row for this prompt, and how many of its positions are in it already (the prefix cache's
        blocks, where ``reuse``); ``extend`` runs the rest."""
        ...

    def extend(self, row: int, ids: Sequence[int], keep: int = 1) -> FloatArray:
        """Run ``ids`` after the row's positions; ``[keep, vocab]``, the logits of the last ``keep``."""
        ...

    def remember(self, row: int, ids: Sequence[int]) -> None:
        """The row now holds the whole prompt ``ids``: keep its blocks for prompts that start alike."""
        ...

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> FloatArray:
        """One step: feed each row its token; ``[len(rows), vocab]`` logits in the order asked."""
        ...

    def fork(self, row: int) -> int:
        """A new row holding a copy of ``row``'s cache (the tuner decodes many copies of one prompt)."""
        ...

    def free(self, row: int) -> None: ...

    def reset(self) -> None:
        """Forget every row (after a failed step: the cache may be half written)."""
        ...

    def reserved_bytes(self, reserves: Sequence[int]) -> int:
        """Cache bytes rows of these worst-case lengths (positions) take at most, laid out together."""
        ...

    def release(self) -> None:
        """Give back memory an idle model does not need (arena spare, freed rows' pages)."""
        ...
