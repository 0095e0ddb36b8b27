"""The built-in encoder tasks' PyTorch references and figures (what their exports are validated by).

A reference is fed llmosd's own tokenisation of the validation inputs (the padded batch) and returns
one array per input; figures compare it with the served pipeline's outputs on the ONNX artifact. The
tasks name them with ``deferred`` (llmosd.tasks.contract): imported in the exporter's child only.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmosd.runtime.tokenizer import Batch

Arrays = Sequence[np.ndarray]


def stack(arrays: Arrays) -> np.ndarray:
    """Per-input arrays of one width as one matrix."""
    return np.stack([np.asarray(a, dtype=np.float32) for a in arrays])


# llmosd's pooling names -> sentence-transformers' (its Pooling module is the reference)
_ST_POOLING = {"mean_sqrt_len": "mean_sqrt_len_tokens"}


def torch_pool(hidden: Any, mask: Any, mode: str) -> Any:
    """sentence-transformers' own Pooling module over the token states: the reference is the library's
    semantics (which token is last under padding, the weights of weightedmean), not a copy of llmosd's."""
    from sentence_transformers.models import Pooling

    pooling = Pooling(hidden.shape[-1], pooling_mode=_ST_POOLING.get(mode, mode))
    return pooling({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]


def forward(model_class: Any, src: Path, batch: Batch) -> Any:
    """The PyTorch model of ``src`` (``model_class.from_pretrained``) on the batch, in fp32, no grad;
    the feeds it does not take (token_type_ids for most) are left out. Returns (output, attention mask)."""
    import torch

    feeds = {
        "input_ids": torch.from_numpy(batch.input_ids),
        "attention_mask": torch.from_numpy(batch.attention_mask),
        "token_type_ids": torch.from_numpy(batch.token_type_ids),
    }
    model = model_class.from_pretrained(str(src), local_files_only=True).eval()
    # its signature, not its code's names: transformers wraps newer models' forward (Qwen3's takes **kwargs)
    accepted = set(inspect.signature(model.forward).parameters)
    with torch.no_grad():
        return model(**{k: v for k, v in feeds.items() if k in accepted}), feeds["attention_mask"]


def embedding_reference(src: Path, batch: Batch, runtime: Mapping[str, Any]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModel

    out, mask = forward(AutoModel, src, batch)
    v = torch_pool(out.last_hidden_state, mask, runtime["pooling"])
    if runtime["normalize"]:
        v = torch.nn.functional.normalize(v, dim=1)
    return list(v.numpy())


def _logits(src: Path, batch: Batch) -> Any:
    from transformers import AutoModelForSequenceClassification

    out, _ = forward(AutoModelForSequenceClassification, src, batch)
    return out.logits.float()


def ranking_reference(src: Path, batch: Batch, runtime: Mapping[str, Any]) -> list[np.ndarray]:
    import torch

    logits = _logits(src, batch)
    ranked = torch.sigmoid(logits[:, :1]) if runtime["score"] == "sigmoid" else torch.softmax(logits, 1)[:, 1:]
    return list(ranked.numpy())


def classification_reference(src: Path, batch: Batch, runtime: Mapping[str, Any]) -> list[np.ndarray]:
    import torch

    logits = _logits(src, batch)
    multi = runtime.get("problem_type") == "multi_label_classification"
    return list((torch.sigmoid(logits) if multi else torch.softmax(logits, dim=1)).numpy())


def max_abs_diff(ref: Arrays, cand: Arrays) -> dict[str, float]:
    worst = max(np.abs(np.asarray(r) - np.asarray(c)).max() for r, c in zip(ref, cand, strict=True))
    return {"max_abs_diff": float(worst)}


def embedding_figures(ref: Arrays, cand: Arrays) -> dict[str, float]:
    r, c = stack(ref), stack(cand)
    cos = (r * c).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))
    return max_abs_diff(ref, cand) | {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def classification_figures(ref: Arrays, cand: Arrays) -> dict[str, float]:
    r, c = stack(ref), stack(cand)
    top2 = np.sort(r, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= 0.01  # near-ties flip on rounding alone
    agree = r.argmax(1) == c.argmax(1)
    agreement = float(agree[decisive].mean()) if decisive.any() else 1.0
    return max_abs_diff(ref, cand) | {"label_agreement": agreement, "label_agreement_all": float(agree.mean())}
