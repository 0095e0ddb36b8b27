"""Tokenisation with the ``tokenizers`` library, padded to the longest sequence of each batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Batch:
    input_ids: Int64Array
    attention_mask: Int64Array
    token_type_ids: Int64Array


class TextTokenizer:
    def __init__(self, path: Path, max_length: int) -> None:
        self._tok = Tokenizer.from_file(str(path))
        # Shipped tokenizer.json files often pad to a fixed length (MiniLM: 128): padding happens per batch.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.max_length = max_length

    @property
    def raw(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no padding, truncation at ``max_length``)."""
        return self._tok

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        return list(self._tok.encode_batch(list(texts)))

    @staticmethod
    def pad(encodings: Sequence[Encoding]) -> Batch:
        width = max(len(e.ids) for e in encodings)
        shape = (len(encodings), width)
        ids = np.zeros(shape, dtype=np.int64)
        mask = np.zeros(shape, dtype=np.int64)
        types = np.zeros(shape, dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = e.attention_mask
            types[row, :n] = e.type_ids
        return Batch(ids, mask, types)
