"""What a Hugging Face model folder says about how it must be served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def model_config(src: Path) -> dict[str, Any]:
    config = _read(src / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{src} has no config.json: not a Hugging Face model folder")
    return config


def max_seq_length(src: Path, config: dict[str, Any]) -> int:
    st = _read(src / "sentence_bert_config.json") or {}
    tok = _read(src / "tokenizer_config.json") or {}
    limits = [st.get("max_seq_length"), tok.get("model_max_length"), config.get("max_position_embeddings")]
    usable = [int(x) for x in limits if isinstance(x, int | float) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


def embedding_settings(src: Path) -> dict[str, Any]:
    """Pooling and normalisation from the sentence-transformers modules.json, if the model has one."""
    modules = _read(src / "modules.json") or []
    pooling, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            cfg = _read(src / module.get("path", "") / "config.json") or {}
            chosen = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
            if len(chosen) != 1:
                raise ValueError(f"unsupported pooling configuration {cfg}: exactly one mode is supported")
            pooling = chosen[0]
        elif kind.endswith(".Normalize"):
            normalize = True
    return {"pooling": pooling, "normalize": normalize}


def classification_settings(config: dict[str, Any]) -> dict[str, Any]:
    id2label = config.get("id2label") or {}
    if not id2label:
        raise ValueError("config.json has no id2label: cannot name the classes")
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return {"labels": labels, "problem_type": config.get("problem_type") or "single_label_classification"}


def ranking_settings(config: dict[str, Any]) -> dict[str, Any]:
    """How a cross-encoder's logits become a relevance score: one label, its sigmoid (sentence-transformers'
    CrossEncoder); two, the second's softmax (binary rerankers); more is not a reranker."""
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
    if labels not in (1, 2):
        raise ValueError(f"a reranker has one or two labels; this model has {labels}: export it as text-classification")
    return {"score": "sigmoid" if labels == 1 else "softmax"}


def source_info(src: Path, config: dict[str, Any], source_id: str | None) -> dict[str, Any]:
    return {
        "id": source_id or config.get("_name_or_path") or src.name,
        "path": str(src),
        "architectures": config.get("architectures", []),
        "model_type": config.get("model_type"),
    }


def generation_settings(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """End-of-sequence ids and the chat template a causal LM ships with."""
    gen = _read(src / "generation_config.json") or {}
    tok = _read(src / "tokenizer_config.json") or {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    template = tok.get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    return {
        "eos_token_ids": eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        "bos_token_id": gen.get("bos_token_id", config.get("bos_token_id")),
        "chat_template": template if isinstance(template, str) else None,
        "sampling": sampling_defaults(gen),
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


def from_gguf(gguf: Path, dst: Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face folder (transformers reads GGUF; needs gguf and accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
