"""Tokenisation with the ``tokenizers`` library, padded to the longest sequence of each batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from llmosd.runtime.backend import Input, InvalidInput

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Ids:
    """Token ids given as they are (no special tokens added): what ``pad`` reads of an Encoding."""

    ids: list[int]

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.ids)

    @property
    def type_ids(self) -> list[int]:
        return [0] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


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
        # Once: tokenizers builds the whole vocabulary map to count it (10 ms for MiniLM's 30,522).
        self.vocab_size = self._tok.get_vocab_size()

    @property
    def raw(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no padding, truncation at ``max_length``)."""
        return self._tok

    def encode_inputs(self, inputs: Sequence[Input], truncate: bool) -> list[Encoding | Ids]:
        """Texts and text pairs encoded (cut at ``max_length`` where ``truncate``: a pair's longer side
        first), token ids checked and taken as sent; an input over the limit that may not be cut, or an id
        outside the vocabulary, is InvalidInput."""
        texts = [x for x in inputs if isinstance(x, str | tuple)]  # a tuple is a pair: ids come as lists
        encoded = iter(self._tok.encode_batch(texts) if texts else [])
        vocab = self.vocab_size
        out: list[Encoding | Ids] = []
        for i, x in enumerate(inputs):
            if isinstance(x, str | tuple):
                encoding = next(encoded)
                item: Encoding | Ids = encoding
                over = bool(encoding.overflowing)
            else:
                ids = [int(t) for t in x]
                if any(t < 0 or t >= vocab for t in ids):
                    raise InvalidInput(f"input {i} holds token ids outside the vocabulary (it has {vocab})")
                item, over = Ids(ids[: self.max_length]), len(ids) > self.max_length
            if over and not truncate:
                raise InvalidInput(
                    f"input {i} is longer than the model's {self.max_length} tokens: shorten it, or send "
                    "'truncate': true to cut it there"
                )
            out.append(item)
        return out

    @staticmethod
    def pad(encodings: Sequence[Encoding | Ids]) -> Batch:
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
