"""Task adapters: an ONNX session plus the pre/post-processing of one task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding

from llmosd.runtime.backend import Input, Output
from llmosd.runtime.memory import shrink_options, trim_heap
from llmosd.runtime.pooling import normalize, pool, sigmoid, softmax
from llmosd.runtime.tokenizer import Ids, TextTokenizer

_WARMUP = ["warm up the session", "a second, somewhat longer sentence to warm up a batch of two"]


class EncoderModel:
    """Shared by encoder tasks (a plugin's too): tokenise, pad to the batch's longest, run the session.
    A subclass gives ``_values`` (one row per input) or overrides ``run`` (outputs of other shapes)."""

    def __init__(self, session: Any, tokenizer: TextTokenizer) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self._inputs = {i.name for i in session.get_inputs()}

    def prepare(self, inputs: Sequence[Input], truncate: bool = True) -> list[Encoding | Ids]:
        return self.tokenizer.encode_inputs(inputs, truncate)

    def forward(self, batch: Sequence[Encoding | Ids], options: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The session's first output for the padded batch, and the batch's attention mask."""
        padded = self.tokenizer.pad(batch)
        feeds = {
            "input_ids": padded.input_ids,
            "attention_mask": padded.attention_mask,
            "token_type_ids": padded.token_type_ids,
        }
        if "position_ids" in self._inputs:  # a decoder embedder's graph (Qwen3-Embedding): padding is on the right
            rows, width = padded.input_ids.shape
            feeds["position_ids"] = np.tile(np.arange(width, dtype=np.int64), (rows, 1))
        out = self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs}, options)
        return out[0], padded.attention_mask

    def release(self) -> None:
        """Give the arena's spare memory back (a one-token run that shrinks it as it ends)."""
        self.forward(self.prepare(["x"]), shrink_options(self.session))
        trim_heap()

    def run(self, batch: Sequence[Encoding | Ids]) -> list[Output]:
        values = self._values(batch)
        return [Output(values[i], len(e)) for i, e in enumerate(batch)]

    def _values(self, batch: Sequence[Encoding | Ids]) -> np.ndarray:
        raise NotImplementedError

    def warmup(self) -> None:
        for n in (1, 2):
            self.run(self.prepare(_WARMUP[:n]))


class EmbeddingModel(EncoderModel):
    def __init__(self, session: Any, tokenizer: TextTokenizer, pooling: str, normalized: bool) -> None:
        super().__init__(session, tokenizer)
        self.pooling = pooling
        self.normalized = normalized
        self.dimensions = int(session.get_outputs()[0].shape[-1])

    def _values(self, batch: Sequence[Encoding | Ids]) -> np.ndarray:
        hidden, mask = self.forward(batch)
        vectors = pool(hidden, mask, self.pooling)
        return normalize(vectors) if self.normalized else vectors


class RankingModel(EncoderModel):
    """A cross-encoder: each input a (query, document) pair, its value one relevance score. ``score``:
    sigmoid of a single logit (sentence-transformers' CrossEncoder with one label), or the second of
    two labels' softmax (rerankers trained as binary classifiers)."""

    SCORES = ("sigmoid", "softmax")

    def __init__(self, session: Any, tokenizer: TextTokenizer, score: str) -> None:
        super().__init__(session, tokenizer)
        if score not in self.SCORES:
            raise ValueError(f"unknown ranking score {score!r}; choose from {', '.join(self.SCORES)}")
        self.score = score

    def warmup(self) -> None:
        for n in (1, 2):
            self.run(self.prepare([(_WARMUP[0], t) for t in _WARMUP[:n]]))

    def _values(self, batch: Sequence[Encoding | Ids]) -> np.ndarray:
        logits, _ = self.forward(batch)
        logits = logits.astype(np.float32)
        if self.score == "sigmoid":
            return sigmoid(logits[:, :1])
        return softmax(logits)[:, 1:2]


class ClassifierModel(EncoderModel):
    def __init__(self, session: Any, tokenizer: TextTokenizer, labels: list[str], multi_label: bool) -> None:
        super().__init__(session, tokenizer)
        self.labels = labels
        self.multi_label = multi_label

    def _values(self, batch: Sequence[Encoding | Ids]) -> np.ndarray:
        logits, _ = self.forward(batch)
        logits = logits.astype(np.float32)
        return sigmoid(logits) if self.multi_label else softmax(logits)
