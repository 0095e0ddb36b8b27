"""What to take from a Hugging Face repository, decided from its file list and config alone (no network):
the reference a person types, the files a recipe needs, the task, and the store name.

References are Ollama's: ``hf.co/ORG/REPO``, a revision with ``@REV``, one GGUF file of a GGUF repository
with ``:QUANT`` (``hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # the hub's repo ids
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_QUANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")
DEFAULT_QUANT = "Q4_K_M"  # Ollama's pick in a GGUF repository when none is named
# Top-level files a recipe reads besides the weights: config, tokenizer (every format transformers reads),
# chat template, generation defaults, and sentence-transformers' description of its pipeline.
_SIDE_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    }
)
_ST_MODULE = re.compile(r"^\d+_[A-Za-z]+/[^/]+$")  # 1_Pooling/config.json, 2_Dense/model.safetensors ...
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


class UnsupportedRepository(ValueError):
    """The repository holds nothing llmosd can export (the message says what it found and what to do)."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str = "main"
    quant: str | None = None

    def __str__(self) -> str:
        at = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf.co/{self.repo_id}{at}" + (f":{self.quant}" if self.quant else "")


def is_hub_ref(text: str) -> bool:
    return text.startswith(PREFIXES)


def parse_hub_ref(text: str) -> HubRef:
    """``hf.co/ORG/REPO[@REV][:QUANT]``; a ValueError that says what is wrong otherwise."""
    rest = next((text[len(p) :] for p in PREFIXES if text.startswith(p)), None)
    if rest is None:
        raise ValueError(f"not a Hugging Face reference: {text[:200]!r} (write hf.co/ORG/REPO)")
    rest, _, quant = rest.partition(":")
    repo, _, revision = rest.partition("@")
    if not _REPO.match(repo) or ".." in repo:
        raise ValueError(f"{text[:200]!r}: the repository must be ORG/REPO (letters, digits, '.', '_', '-')")
    if revision and (not _REVISION.match(revision) or ".." in revision):
        raise ValueError(f"{text[:200]!r}: bad revision {revision[:130]!r}")
    if quant and not _QUANT.match(quant):
        raise ValueError(f"{text[:200]!r}: bad quantisation {quant[:40]!r} (such as Q4_K_M)")
    return HubRef(repo, revision or "main", quant or None)


def _quant_of(filename: str, quant: str) -> bool:
    return (
        re.search(rf"(^|[-_.]){re.escape(quant)}([-_.]|$)", filename.rsplit("/", 1)[-1][: -len(".gguf")], re.I)
        is not None
    )


def choose_gguf(files: Iterable[str], quant: str | None) -> str:
    """The one GGUF file a reference names (``:QUANT``), or Ollama's default, or the only one there is."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if not ggufs:
        raise UnsupportedRepository("the repository has no GGUF file: drop the :QUANT to take its weights")
    wanted = [f for f in ggufs if _quant_of(f, quant or DEFAULT_QUANT)]
    if not wanted and quant is None and len(ggufs) == 1:
        wanted = ggufs
    if not wanted:
        have = ", ".join(sorted({_quant_label(f) for f in ggufs}))
        name = quant or f"none named (the default is {DEFAULT_QUANT})"
        raise UnsupportedRepository(f"no GGUF file of quantisation {name}; the repository has: {have}")
    wanted.sort(key=lambda f: (f.count("/"), f))  # top-level first
    if _SPLIT_GGUF.search(wanted[0]):
        raise UnsupportedRepository(f"{wanted[0]} is one part of a split GGUF file: split files are not supported")
    return wanted[0]


def _quant_label(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1][: -len(".gguf")]
    found = re.findall(r"(?:^|[-_.])((?:I?Q\d[A-Z0-9_]*|F16|BF16|F32))$", stem, re.I)
    return found[-1] if found else stem


def select_files(files: Iterable[str], quant: str | None) -> list[str]:
    """The files to download: one GGUF file where a quantisation is named or the repository has only
    GGUF weights; else the side files and the weights (safetensors where there are any, else PyTorch's
    .bin), top level and sentence-transformers' module folders only (no onnx/, original/ copies)."""
    names = list(files)
    top = [f for f in names if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    torch_bins = [f for f in top if re.fullmatch(r"pytorch_model(-\d{5}-of-\d{5})?\.bin(\.index\.json)?", f)]
    if quant is not None or not (safetensors or torch_bins):
        if any(f.lower().endswith(".gguf") for f in names):
            return [choose_gguf(names, quant)]
        raise UnsupportedRepository("the repository has neither safetensors, PyTorch nor GGUF weights")
    weights = safetensors or torch_bins
    side = [f for f in top if f in _SIDE_FILES]
    if "config.json" not in side:
        raise UnsupportedRepository("the repository has weights but no config.json: it is not a transformers model")
    modules = [f for f in names if _ST_MODULE.match(f)]
    return sorted({*weights, *side, *modules})


# transformers' architecture suffixes -> llmosd's tasks
_HEADS = (
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text-generation"),
    ("LMHeadModel", "text-generation"),
)


def task_of(config: Mapping[str, Any] | None, files: Iterable[str]) -> str:
    """The task a checkpoint's files and config say it is for; UnsupportedRepository where they do not say."""
    names = set(files)
    if any(f.lower().endswith(".gguf") for f in names):
        return "text-generation"
    if "modules.json" in names or "sentence_bert_config.json" in names:
        return "feature-extraction"
    architectures = [a for a in (config or {}).get("architectures") or [] if isinstance(a, str)]
    for arch in architectures:
        for suffix, task in _HEADS:
            if arch.endswith(suffix):
                return task
        if arch.endswith("ForSequenceClassification"):
            labels = (config or {}).get("id2label") or {}
            return (
                "text-ranking" if len(labels) == 1 or (config or {}).get("num_labels") == 1 else "text-classification"
            )
    if architectures and all(a.endswith("Model") for a in architectures):
        return "feature-extraction"  # a bare encoder: its embeddings
    raise UnsupportedRepository(
        f"cannot tell which task {', '.join(architectures) or 'this checkpoint'} is for: pass --task"
    )


def default_name(ref: HubRef) -> str:
    """The store name a pull takes unless given one: the repository's, lowercased (``-GGUF`` dropped, the
    quantisation added), within the store's naming rules."""
    base = ref.repo_id.split("/", 1)[1].lower()
    base = re.sub(r"[-_.]gguf$", "", base)
    if ref.quant:
        base = f"{base}-{ref.quant.lower()}"
    base = re.sub(r"[^a-z0-9._-]", "-", base).strip("-._") or "model"
    return base[:64].rstrip("-._")
