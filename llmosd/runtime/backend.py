"""The contract between the batcher and a model: prepare / run / warmup (Infinity's split).

The batcher knows no models: it asks ``prepare`` to turn raw inputs into sized items (their ``len`` is
their token count), orders and groups them, and hands each group to ``run``. Both are called in a
worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

P = TypeVar("P", bound=Sized)
# A text, a (query, document) pair (a cross-encoder's), or the model's own token ids (OpenAI's token arrays).
Input = str | tuple[str, str] | Sequence[int]


class InvalidInput(ValueError):
    """An input the model cannot take as it is (too long and not to be cut, ids outside the vocabulary)."""


@dataclass(frozen=True)
class Output:
    """One input's result: a float vector (embedding or label scores) and its token count."""

    values: npt.NDArray[np.float32]
    tokens: int


class Backend(Protocol[P]):
    def prepare(self, inputs: Sequence[Input], truncate: bool = True) -> list[P]:
        """Items ready to batch; an input longer than the model takes is cut at its limit where
        ``truncate``, else refused (InvalidInput)."""
        ...

    def run(self, batch: Sequence[P]) -> list[Output]: ...

    def warmup(self) -> None: ...

    def release(self) -> None:
        """Give back memory the runs left in the session's arena (called by an idle worker)."""
        ...
