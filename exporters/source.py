"""What a Hugging Face model folder says about itself, whatever its task (each task reads its own settings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def source_info(src: Path, config: dict[str, Any], source_id: str | None) -> dict[str, Any]:
    return {
        "id": source_id or config.get("_name_or_path") or src.name,
        "path": str(src),
        "architectures": config.get("architectures", []),
        "model_type": config.get("model_type"),
    }


def from_gguf(gguf: Path, dst: Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face folder (transformers reads GGUF; needs gguf and accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
