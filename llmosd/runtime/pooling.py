"""Pooling, normalisation and label scoring in numpy (the sentence-transformers semantics)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")


def pool(hidden: F32, mask: npt.NDArray[np.int64], mode: str) -> F32:
    """Reduce ``[batch, seq, dim]`` token states to ``[batch, dim]``, ignoring padding."""
    out: F32
    m = mask[..., None].astype(np.float32)
    if mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = np.where(m > 0, hidden, -1e9).max(axis=1)
    elif mode in ("mean", "mean_sqrt_len"):
        summed = (hidden * m).sum(axis=1)
        counts = np.clip(m.sum(axis=1), 1e-9, None)
        out = summed / (counts if mode == "mean" else np.sqrt(counts))
    elif mode == "weightedmean":  # SGPT's: the i-th token (from 1) weighs i
        w = m * np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None]
        out = (hidden * w).sum(axis=1) / np.clip(w.sum(axis=1), 1e-9, None)
    elif mode == "lasttoken":  # decoder embedders (Qwen3-Embedding, e5-mistral): each row's last real token
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
        out = hidden[np.arange(hidden.shape[0]), last]
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return out.astype(np.float32, copy=False)


def normalize(v: F32) -> F32:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    out: F32 = (v / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)
    return out


def softmax(logits: F32) -> F32:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: F32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)
    return out


def sigmoid(logits: F32) -> F32:
    out: F32 = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32, copy=False)
    return out
