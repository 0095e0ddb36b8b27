"""Pooling, normalisation and label scoring in numpy (the sentence-transformers semantics)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len")


def pool(hidden: F32, mask: npt.NDArray[np.int64], mode: str) -> F32:
    """Reduce ``[batch, seq, dim]`` token states to ``[batch, dim]``, ignoring padding."""
    if mode == "cls":
        return hidden[:, 0].astype(np.float32)
    m = mask[..., None].astype(np.float32)
    if mode == "max":
        return np.where(m > 0, hidden, -1e9).max(axis=1).astype(np.float32)
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    if mode == "mean":
        return (summed / counts).astype(np.float32)
    if mode == "mean_sqrt_len":
        return (summed / np.sqrt(counts)).astype(np.float32)
    raise ValueError(f"unknown pooling mode {mode!r}")


def normalize(v: F32) -> F32:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.clip(norms, 1e-12, None)).astype(np.float32)


def softmax(logits: F32) -> F32:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def sigmoid(logits: F32) -> F32:
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
