"""Validation of a causal LM export against PyTorch: teacher-forced top-1 agreement, perplexity, and
free-running greedy agreement (informational: on small models the first token is often a near-tie)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporters.validate import INPUTS
from llmosd.tasks import Checked

TEXT = " ".join(INPUTS[:6])
PROMPT = INPUTS[0]
GREEDY_TOKENS = 16
DECISIVE_LOGIT_MARGIN = 0.1  # positions whose top-2 logits are closer than this are near-ties


class OnnxCausalLM:
    """Just enough of a KV-cached forward pass over an optimum text-generation-with-past export."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = [name for name in self.inputs if name.startswith("past_key_values.")]
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        # A pruned LM head (the fused recipe: the last position's logits unless a run asks for more with
        # logits_to_keep): one position a run, as the server decodes.
        self.last_only = logits.shape[1] == 1 or "logits_to_keep" in self.inputs

    def empty_past(self) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.past:
            _, heads, _, dim = self.inputs[name].shape
            dtype = np.float16 if self.inputs[name].type == "tensor(float16)" else np.float32
            feeds[name] = np.zeros((1, int(heads), 0, int(dim)), dtype=dtype)
        return feeds

    def forward(
        self, ids: list[int], past: dict[str, np.ndarray], past_len: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(ids)
        feeds: dict[str, np.ndarray] = {"input_ids": np.array([ids], dtype=np.int64), **past}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past_len + n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None, :]
        if "logits_to_keep" in self.inputs:
            feeds["logits_to_keep"] = np.array([1], dtype=np.int64)
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        present = {
            n.replace("present", "past_key_values"): v
            for n, v in zip(names, outputs, strict=True)
            if n.startswith("present")
        }
        return outputs[names.index("logits")][0].astype(np.float32), present


def teacher_forced(model: OnnxCausalLM, ids: list[int]) -> np.ndarray:
    """Logits at every position of ``ids``: one run, or one position a run through the KV cache where
    the graph computes the last position's only (which also checks the cache the server uses)."""
    if not model.last_only:
        return model.forward(ids, model.empty_past(), 0)[0]
    rows, past = [], model.empty_past()
    for i, token in enumerate(ids):
        logits, past = model.forward([token], past, i)
        rows.append(logits[-1])
    return np.stack(rows)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logp = _log_softmax(logits[:-1].astype(np.float64))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def reference_model(src: Path) -> tuple[Any, str]:
    """The PyTorch reference, computing in fp32, and what it computes in.

    Its weights stay in the checkpoint's dtype and each Linear's weight is made fp32 only while it runs:
    bf16 and fp16 widen to fp32 exactly, so this computes what the fp32 model computes, in the memory of
    the checkpoint (an 8B: 16 GB, not 32). A module that holds matrices of its own (gpt-oss's experts: the
    bulk of its weights, in 3-d tensors) has them all widened while it runs."""
    import torch

    from exporters import weights

    try:
        checkpoint = weights.Checkpoint(src)
    except FileNotFoundError:  # .bin weights: transformers' loader, in fp32
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True).eval(), "fp32"  # type: ignore[no-untyped-call]
    stored = weights.torch_dtype(checkpoint.dtype)
    model = weights.load(src, stored, checkpoint)
    if stored == torch.float32:
        return model, "fp32"
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _fp32_linear(module)  # type: ignore[method-assign]
        elif isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(lambda _m, _i, out: out.float())
        elif any(p.ndim > 1 for p in module.parameters(recurse=False)):
            _widened_while_running(module)
    return model, f"fp32 (computed over its {weights.DTYPE_NAMES.get(checkpoint.dtype, checkpoint.dtype)} weights)"


def _widened_while_running(module: Any) -> None:
    import torch

    kept: dict[str, Any] = {}

    def widen(m: Any, _inputs: Any) -> None:
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                kept[name] = p
                m._parameters[name] = torch.nn.Parameter(p.float(), requires_grad=False)

    def narrow(m: Any, _inputs: Any, _out: Any) -> None:
        m._parameters.update(kept)
        kept.clear()

    module.register_forward_pre_hook(widen)
    module.register_forward_hook(narrow)


WIDEN = 32 << 20  # weights widened to fp32 at a time: an 8B's LM head (525M) would take 2.1 GB at once


def _fp32_linear(module: Any) -> Any:
    import torch

    def forward(x: Any) -> Any:
        weight, bias = module.weight, module.bias
        rows = max(1, WIDEN // weight.shape[1])
        parts = [
            torch.nn.functional.linear(
                x.float(), weight[at : at + rows].float(), None if bias is None else bias[at : at + rows].float()
            )
            for at in range(0, weight.shape[0], rows)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    return forward


def _reference(src: Path, ids: list[int], prompt: list[int]) -> tuple[np.ndarray, list[int], str]:
    """PyTorch's logits at every position of ``ids`` and its greedy continuation of ``prompt`` (recomputing
    the whole prefix each step); the model is gone when this returns."""
    import gc

    import torch

    ref_model, dtype = reference_model(src)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float().numpy()
        ref_ids = list(prompt)
        for _ in range(GREEDY_TOKENS):
            ref_ids.append(int(ref_model(torch.tensor([ref_ids])).logits[0, -1].argmax()))
    del ref_model
    gc.collect()
    return ref, ref_ids[len(prompt) :], dtype


def figures(src: Path, check: Checked) -> dict[str, Any]:
    tokenizer = check.tokenizer.raw
    ids = tokenizer.encode(TEXT).ids
    prompt = tokenizer.encode(PROMPT).ids
    # the reference first and alone: the artifact's session opens only after PyTorch's model is gone
    ref, ref_greedy, dtype = _reference(src, ids, prompt)
    model = OnnxCausalLM(check.session)
    cand = teacher_forced(model, ids)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_LOGIT_MARGIN
    agree = ref.argmax(-1) == cand.argmax(-1)
    out: dict[str, Any] = {
        "reference_dtype": dtype,
        "positions": len(ids),
        "top1_agreement": float(agree[decisive].mean()) if decisive.any() else 1.0,
        "top1_agreement_all": float(agree.mean()),
        "perplexity_reference": _perplexity(ref, ids),
        "perplexity": _perplexity(cand, ids),
        "max_abs_logit_diff": float(np.abs(ref - cand).max()),
    }
    out["perplexity_ratio"] = out["perplexity"] / out["perplexity_reference"]
    # What a box with other CPU kernels re-checks the artifact against before serving it (the gate's short
    # form, without PyTorch): the text, and PyTorch's next token at each decisive position.
    out["recheck"] = {
        "ids": [int(i) for i in ids],
        "positions": [int(p) for p in np.flatnonzero(decisive)],
        "top1": [int(t) for t in ref.argmax(-1)[decisive]],
    }
    # Free-running greedy, the export with its KV cache against PyTorch recomputing the whole prefix.
    cand_ids = list(prompt)
    logits, past = model.forward(prompt, model.empty_past(), 0)
    for _ in range(GREEDY_TOKENS):
        cand_ids.append(int(logits[-1].argmax()))
        logits, past = model.forward([cand_ids[-1]], past, len(cand_ids) - 1)
    generated = list(zip(ref_greedy, cand_ids[len(prompt) :], strict=True))
    diverged = next((i for i, (a, b) in enumerate(generated) if a != b), None)
    out["greedy_tokens"] = GREEDY_TOKENS
    out["greedy_first_divergence"] = diverged  # None: identical for all GREEDY_TOKENS
    return out


def validate_task(check: Checked) -> dict[str, Any]:
    """The text-generation task's validation hook: teacher-forced top-1 agreement and perplexity."""
    return figures(check.src, check)
