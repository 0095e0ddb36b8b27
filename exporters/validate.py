"""Validate an exported artifact against the PyTorch model it came from.

The candidate is the whole served pipeline (llmosd's tokenizer, the ONNX session, llmosd's numpy
pooling); the reference is the PyTorch model fed the same token ids, pooled in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporters.recipes import Tolerance
from llmosd.runtime.providers import Placement, ProviderSelector
from llmosd.runtime.tasks import ClassifierModel, EmbeddingModel, RankingModel
from llmosd.runtime.tokenizer import TextTokenizer

INPUTS = (Path(__file__).parent / "validation.txt").read_text().splitlines()
# A cross-encoder's inputs: each text as a query against the next three (unrelated and related alike).
PAIRS = [(q, INPUTS[(i + k) % len(INPUTS)]) for i, q in enumerate(INPUTS) for k in (1, 2, 3)]


class ValidationFailed(Exception):
    pass


def _torch_pool(hidden: Any, mask: Any, mode: str) -> Any:
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = m.sum(dim=1).clamp(min=1e-9)
    return summed / (torch.sqrt(counts) if mode == "mean_sqrt_len" else counts)


def _reference(src: Path, task: str, tokenizer: TextTokenizer, runtime: dict[str, Any]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    batch = tokenizer.pad(tokenizer.encode_inputs(PAIRS if task == "text-ranking" else INPUTS, truncate=True))
    feeds = {
        "input_ids": torch.from_numpy(batch.input_ids),
        "attention_mask": torch.from_numpy(batch.attention_mask),
        "token_type_ids": torch.from_numpy(batch.token_type_ids),
    }
    cls = AutoModel if task == "feature-extraction" else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(src), local_files_only=True).eval()
    accepted = set(model.forward.__code__.co_varnames)
    with torch.no_grad():
        out = model(**{k: v for k, v in feeds.items() if k in accepted})
        if task == "feature-extraction":
            v = _torch_pool(out.last_hidden_state, feeds["attention_mask"], runtime["pooling"])
            if runtime["normalize"]:
                v = torch.nn.functional.normalize(v, dim=1)
            vectors: np.ndarray = v.numpy()
            return vectors
        logits = out.logits.float()
        if task == "text-ranking":
            ranked = torch.sigmoid(logits[:, :1]) if runtime["score"] == "sigmoid" else torch.softmax(logits, 1)[:, 1:]
            return np.asarray(ranked.numpy())
        multi = runtime.get("problem_type") == "multi_label_classification"
        scores: np.ndarray = (torch.sigmoid(logits) if multi else torch.softmax(logits, dim=1)).numpy()
        return scores


def _session(model: Path, devices: tuple[str, ...]) -> tuple[Any, Placement]:
    # A CUDA-only artifact (fp16) is still checked where no GPU loads: ORT's CPU provider runs fp16
    # graphs, more slowly; the manifest records which device produced the figures.
    return ProviderSelector().create(model, (*devices, "cpu"))


Backend = EmbeddingModel | ClassifierModel | RankingModel


def _backend(
    model: Path, tokenizer: TextTokenizer, task: str, runtime: dict[str, Any], devices: tuple[str, ...]
) -> tuple[Backend, str]:
    session, placement = _session(model, devices)
    if task == "feature-extraction":
        return EmbeddingModel(session, tokenizer, runtime["pooling"], runtime["normalize"]), placement.device
    if task == "text-ranking":
        return RankingModel(session, tokenizer, runtime["score"]), placement.device
    multi = runtime.get("problem_type") == "multi_label_classification"
    return ClassifierModel(session, tokenizer, runtime["labels"], multi), placement.device


def _run(backend: Backend, items: list[Any]) -> np.ndarray:
    return np.stack([o.values for o in backend.run(backend.prepare(items))])


def invariance(backend: Backend, items: list[Any], batched: np.ndarray) -> float:
    """Max abs difference of each input's output alone, in the whole batch (padded to its longest) and
    in that batch reversed (every other position): what the daemon's batching must not change."""
    reversed_ = _run(backend, items[::-1])[::-1]
    alone = np.concatenate([_run(backend, [item]) for item in items])
    return float(max(np.abs(alone - batched).max(), np.abs(reversed_ - batched).max()))


def _candidate(
    model: Path, tokenizer: TextTokenizer, task: str, runtime: dict[str, Any], devices: tuple[str, ...]
) -> tuple[np.ndarray, float, str]:
    backend, device = _backend(model, tokenizer, task, runtime, devices)
    items: list[Any] = list(PAIRS) if task == "text-ranking" else INPUTS
    batched = _run(backend, items)
    return batched, invariance(backend, items, batched), device


def figures(task: str, ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    out = {"max_abs_diff": float(np.abs(ref - cand).max())}
    if task == "text-ranking":
        return out
    if task == "feature-extraction":
        cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
        out |= {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    else:
        top2 = np.sort(ref, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) >= 0.01  # near-ties flip on rounding alone
        agree = ref.argmax(1) == cand.argmax(1)
        out["label_agreement"] = float(agree[decisive].mean()) if decisive.any() else 1.0
        out["label_agreement_all"] = float(agree.mean())
    return out


def check(figs: dict[str, Any], tol: Tolerance) -> list[str]:
    problems = []
    if tol.min_cosine is not None and figs["min_cosine"] < tol.min_cosine:
        problems.append(f"min cosine {figs['min_cosine']:.5f} < {tol.min_cosine}")
    if tol.mean_cosine is not None and figs["mean_cosine"] < tol.mean_cosine:
        problems.append(f"mean cosine {figs['mean_cosine']:.5f} < {tol.mean_cosine}")
    if tol.max_abs_diff is not None and figs["max_abs_diff"] > tol.max_abs_diff:
        problems.append(f"max abs diff {figs['max_abs_diff']:.2e} > {tol.max_abs_diff}")
    if tol.label_agreement is not None and figs["label_agreement"] < tol.label_agreement:
        problems.append(f"label agreement {figs['label_agreement']:.3f} < {tol.label_agreement}")
    if tol.top1_agreement is not None and figs["top1_agreement"] < tol.top1_agreement:
        problems.append(f"top-1 agreement {figs['top1_agreement']:.3f} < {tol.top1_agreement}")
    moved = figs.get("batch_invariance_max_abs_diff")
    if tol.batch_invariance is not None and moved is not None and moved > tol.batch_invariance:
        problems.append(f"an output alone and in a batch differ by {moved:.2e} > {tol.batch_invariance}")
    ratio = float(figs.get("perplexity_ratio", 1.0))
    if tol.perplexity_ratio is not None and not 1 / tol.perplexity_ratio <= ratio <= tol.perplexity_ratio:
        # both ways: a perplexity well below the reference's is a different model too
        problems.append(
            f"perplexity ratio {ratio:.4f} outside [{1 / tol.perplexity_ratio:.4f}, {tol.perplexity_ratio}]"
        )
    return problems


def validate(
    src: Path,
    model: Path,
    tokenizer_file: Path,
    task: str,
    runtime: dict[str, Any],
    devices: tuple[str, ...],
    tol: Tolerance,
) -> dict[str, Any]:
    tokenizer = TextTokenizer(tokenizer_file, int(runtime["max_seq_length"]))
    if task == "text-generation":
        from exporters.validate_generation import OnnxCausalLM
        from exporters.validate_generation import figures as generation_figures

        session, placement = _session(model, devices)
        figs = generation_figures(src, OnnxCausalLM(session), tokenizer.raw)
        device = placement.device
    else:
        ref = _reference(src, task, tokenizer, runtime)
        cand, moved, device = _candidate(model, tokenizer, task, runtime, devices)
        figs = figures(task, ref, cand) | {"batch_invariance_max_abs_diff": moved}
    result: dict[str, Any] = {
        "reference": "pytorch fp32",
        "device": device,
        "inputs": [list(p) for p in PAIRS] if task == "text-ranking" else INPUTS,
        "figures": figs,
        "tolerance": {k: v for k, v in vars(tol).items() if v is not None},
    }
    problems = check(figs, tol)
    if problems:
        raise ValidationFailed("; ".join(problems))
    result["passed"] = True
    return result
