"""The text-generation task: causal LMs over OpenAI's /v1/completions and /v1/chat/completions (the routes
live in ``llmosd.api.completions``: their requests, tools and streams are the API's largest part), served
by the continuous-batching generation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmosd.api import completions
from llmosd.api.openapi import GENERATION_PATHS
from llmosd.runtime.adapters import Adapting, Served
from llmosd.runtime.generator import TextGenerator
from llmosd.tasks.contract import Export, Source, Task, Tolerance, deferred

NAME = "text-generation"


def adapter(a: Adapting) -> TextGenerator:
    generator = TextGenerator(a.session, a.tokenizer_path, dict(a.runtime), a.max_context, a.max_sequences)
    generator.sampling_defaults |= a.sampling  # `llmosd models set`, over the manifest's
    return generator


def describe(backend: Served) -> dict[str, Any]:
    if not isinstance(backend, TextGenerator):
        return {}
    return {
        "context_length": backend.context_length,
        "chat_template": backend.chat is not None,
        "reasoning": backend.reasoning.as_dict() if backend.reasoning else None,
        "kv_bytes_per_token": backend.lm.bytes_per_token,
        "batch_invariance": backend.invariance.as_dict(),
        "rechecked_here": backend.rechecked,  # exported on a CPU with other kernels: the gate's short form
    }


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(gen: dict[str, Any]) -> dict[str, Any]:
    """The sampling a model's authors set in generation_config.json (vLLM's defaults too); a config
    that says ``do_sample: false`` means greedy, as in transformers."""
    out = {k: gen[k] for k in _SAMPLING_KEYS if isinstance(gen.get(k), int | float) and not isinstance(gen[k], bool)}
    if gen.get("do_sample") is False:
        out = {"temperature": 0.0}
    if "max_new_tokens" in gen and isinstance(gen["max_new_tokens"], int):
        out["max_tokens"] = gen["max_new_tokens"]
    return out


def generation_settings(src: Source) -> dict[str, Any]:
    """End-of-sequence ids, the chat template a causal LM ships with, and its sampling defaults: its
    generation_config.json's, then ``--sampling KEY=VALUE`` (the recipe's or a person's)."""
    from llmosd.runtime.sampling import check_defaults, parse_number

    gen = src.json("generation_config.json") or {}
    tok = src.json("tokenizer_config.json") or {}
    eos = gen.get("eos_token_id", src.config.get("eos_token_id"))
    template = tok.get("chat_template")
    if isinstance(template, list):  # named templates (Hermes, Command-R): the default one, as transformers takes it
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if template is None and (src.path / "chat_template.jinja").is_file():
        template = (src.path / "chat_template.jinja").read_text()
    sampling: dict[str, object] = sampling_defaults(gen)
    sampling |= {key: parse_number(key, text) for key, text in src.sampling.items()}
    template = template if isinstance(template, str) else None
    return {
        "eos_token_ids": eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        "bos_token_id": gen.get("bos_token_id", src.config.get("bos_token_id")),
        "chat_template": template,
        "reasoning": reasoning_format(template, src.tokenizer),
        "sampling": check_defaults(sampling),
    }


def reasoning_format(template: str | None, tokenizer: Path | None) -> dict[str, Any] | None:
    """Whether and how the model thinks before it answers (llmosd.runtime.reasoning), from its template
    and its tokenizer's tokens; None where it does not."""
    from tokenizers import Tokenizer

    from llmosd.runtime.chat import ChatTemplate
    from llmosd.runtime.reasoning import detect

    if template is None or tokenizer is None or not tokenizer.is_file():
        return None
    tok = Tokenizer.from_file(str(tokenizer))
    words = lambda text: list(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
    found = detect(template, tok.token_to_id, ChatTemplate(template).variables, words)
    return found.as_dict() if found else None


# One gate for every precision (issue 13): teacher-forced top-1 agreement with PyTorch fp32 on the
# decisive positions of a fixed text >= 0.95, perplexity within 5 % either way. fp32 must match.
TASK = Task(
    name=NAME,
    summary="Text generation with a causal LM (/v1/chat/completions, /v1/completions)",
    adapter=adapter,
    export=Export(
        optimum_task="text-generation-with-past",
        tolerances={
            "fp32": Tolerance(top1_agreement=0.99, perplexity_ratio=1.01),
            "fp16": Tolerance(top1_agreement=0.95, perplexity_ratio=1.05),  # CUDA's precision; CPU validates it
            "int8": Tolerance(top1_agreement=0.95, perplexity_ratio=1.05),
            # SmolLM2-135M (itself a Q4_1 GGUF, dequantised as the reference): the fused recipe's
            # k_quant_mixed reaches 0.75, optimum's asymmetric blocks of 32 0.73. int4 is refused there.
            "int4": Tolerance(top1_agreement=0.95, perplexity_ratio=1.05),
        },
        settings=generation_settings,
        validate=deferred("exporters.validate_generation:validate_task"),
        # On CPU MatMulNBits int4 decodes faster than int8; a GGUF Q4 source passes at int4 by its own
        # blocks, a re-quantised one often does not and gets int8.
        auto=("int4", "int8", "fp32"),
        # Dynamic int8 took SmolLM2-135M's teacher-forced top-1 agreement with PyTorch to 0.47 and its
        # perplexity x1.43; weight-only keeps 0.98 and x1.003.
        int8_scheme="weight-only",
        fused=True,
        extra_files={"generation_config.json": "generation-config"},
    ),
    routes=completions.routes,
    paths=GENERATION_PATHS,
    describe=describe,
    # A decode step is the gap between two tokens of every stream (100 ms: 10 tokens/s, faster than people read).
    latency_budget_ms=100.0,
)
