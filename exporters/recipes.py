"""What each task's export must achieve before its artifact is trusted."""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float | None = None
    mean_cosine: float | None = None
    max_abs_diff: float | None = None
    label_agreement: float | None = None
    top1_agreement: float | None = None  # causal LMs: teacher-forced next-token argmax vs PyTorch
    perplexity_ratio: float | None = None  # causal LMs: export's perplexity / PyTorch's, on a fixed text
    # Encoders: max abs difference of an output alone and inside a padded batch (validate.invariance).
    # Bitwise where the kernels allow; 1e-5 is the bound for where they do not.
    batch_invariance: float | None = None


INVARIANT = 1e-5


@dataclass(frozen=True)
class Recipe:
    task: str
    optimum_task: str
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    # Int8 on the MatMuls only: per-channel signed weights. Per-tensor weights lose too much
    # (MiniLM min cosine 0.87) and quantising the embedding table too costs ~0.01 of min cosine.
    int8_ops: tuple[str, ...] = ("MatMul",)
    # "per-token" (weights and activations int8, one activation scale per row: batch-invariant) or
    # "weight-only" (MatMulNBits). Causal LMs need weight-only: dynamic int8 took SmolLM2-135M's
    # teacher-forced top-1 agreement with PyTorch to 0.47 and its perplexity x1.43; weight-only keeps
    # 0.98 and x1.003. For MiniLM per-token runs 1.45x fp32 at min cosine 0.9925 (bench/int8.py).
    int8_scheme: str = "per-token"
    opset: int = 17


RECIPES = {
    "feature-extraction": Recipe(
        task="feature-extraction",
        optimum_task="feature-extraction",
        tolerances={
            "fp32": Tolerance(min_cosine=0.9999, max_abs_diff=1e-3, batch_invariance=INVARIANT),
            "fp16": Tolerance(min_cosine=0.999, max_abs_diff=1e-2, batch_invariance=INVARIANT),
            # the default precision: what a vector store indexes must stay within 0.99 of PyTorch
            "int8": Tolerance(min_cosine=0.99, mean_cosine=0.995, batch_invariance=INVARIANT),
        },
    ),
    "text-generation": Recipe(
        task="text-generation",
        optimum_task="text-generation-with-past",
        int8_scheme="weight-only",
        # One gate for every precision (issue 13): teacher-forced top-1 agreement with PyTorch fp32 on the
        # decisive positions of a fixed text >= 0.95, perplexity within 5 % either way. fp32 must match.
        tolerances={
            "fp32": Tolerance(top1_agreement=0.99, perplexity_ratio=1.01),
            "fp16": Tolerance(top1_agreement=0.95, perplexity_ratio=1.05),  # CUDA's precision; CPU validates it
            "int8": Tolerance(top1_agreement=0.95, perplexity_ratio=1.05),
            # SmolLM2-135M (itself a Q4_1 GGUF, dequantised as the reference): the fused recipe's
            # k_quant_mixed reaches 0.75, optimum's asymmetric blocks of 32 0.73. int4 is refused there.
            "int4": Tolerance(top1_agreement=0.95, perplexity_ratio=1.05),
        },
    ),
    # Cross-encoders (rerankers): sequence classification over (query, document) pairs, one relevance
    # score each. The gate is on the scores the daemon serves (after sigmoid or softmax).
    "text-ranking": Recipe(
        task="text-ranking",
        optimum_task="text-classification",
        tolerances={
            "fp32": Tolerance(max_abs_diff=1e-4, batch_invariance=INVARIANT),
            "fp16": Tolerance(max_abs_diff=1e-2, batch_invariance=INVARIANT),
            "int8": Tolerance(max_abs_diff=0.05, batch_invariance=INVARIANT),
        },
    ),
    "text-classification": Recipe(
        task="text-classification",
        optimum_task="text-classification",
        tolerances={
            "fp32": Tolerance(max_abs_diff=1e-3, label_agreement=1.0, batch_invariance=INVARIANT),
            "fp16": Tolerance(max_abs_diff=1e-2, label_agreement=0.95, batch_invariance=INVARIANT),
            "int8": Tolerance(max_abs_diff=0.05, label_agreement=0.9, batch_invariance=INVARIANT),
        },
    ),
}
