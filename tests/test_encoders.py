"""The retrieval encoders of the year beyond BERT (issue 34, point 4): XLM-RoBERTa (bge-m3's and
multilingual-e5's shape) as an embedder and as a cross-encoder (bge-reranker-v2-m3's), ModernBERT
(gte-modernbert's, nomic's), a decoder embedder (Qwen3-Embedding's: a causal Qwen3 with last-token
pooling), and SGPT's weighted mean. Each is a tiny random checkpoint built from its transformers config
with sentence-transformers' files, exported by ``llmosd export`` and refused unless the gate passes: the
served pipeline on the artifact against PyTorch with sentence-transformers' own Pooling module, and the
same inputs alone and batched (batch invariance)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llmosd.store import ModelStore
from tests.conftest import TINY_BERT, TINY_LLAMA, Daemon, copy_minilm_tokenizer, export, http_json, start_daemon

SMALL = TINY_BERT | {"max_position_embeddings": 130}  # XLM-R counts positions from its padding id + 1


def _models() -> dict[str, Callable[[], Any]]:
    import transformers as t

    return {
        "xlmr": lambda: t.XLMRobertaModel(t.XLMRobertaConfig(**SMALL, pad_token_id=0)),
        "xlmr-rerank": lambda: t.XLMRobertaForSequenceClassification(
            t.XLMRobertaConfig(**SMALL, pad_token_id=0, num_labels=1)
        ),
        "modernbert": lambda: t.ModernBertModel(
            t.ModernBertConfig(**TINY_BERT, pad_token_id=0, global_attn_every_n_layers=2, local_attention=8)
        ),
        "qwen3-embed": lambda: t.Qwen3Model(
            t.Qwen3Config(**(TINY_LLAMA | {"max_position_embeddings": 512}), head_dim=16)
        ),
        "bert-weightedmean": lambda: t.BertModel(t.BertConfig(**TINY_BERT)),
    }


# name -> (task, pooling (sentence-transformers' key) or None, normalize, precisions)
CASES: dict[str, tuple[str, str | None, bool, tuple[str, ...]]] = {
    "xlmr": ("feature-extraction", "pooling_mode_mean_tokens", True, ("fp32", "int8")),
    "xlmr-rerank": ("text-ranking", None, False, ("fp32",)),
    "modernbert": ("feature-extraction", "pooling_mode_cls_token", False, ("fp32",)),
    "qwen3-embed": ("feature-extraction", "pooling_mode_lasttoken", True, ("fp32",)),
    "bert-weightedmean": ("feature-extraction", "pooling_mode_weightedmean_tokens", False, ("fp32",)),
}
POOLED = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}


def checkpoint(name: str, dst: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = _models()[name]().eval()
    model.save_pretrained(dst)
    copy_minilm_tokenizer(dst)
    _, pooling, normalize, _ = CASES[name]
    if pooling is not None:  # sentence-transformers' description of the pipeline
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
            (dst / "2_Normalize").mkdir()
        (dst / "modules.json").write_text(json.dumps(modules))
        (dst / "1_Pooling").mkdir()
        width = model.config.hidden_size
        (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": width, pooling: True}))
    if name == "qwen3-embed":  # Qwen3-Embedding's instruction for queries; documents go as they are
        prompts = {"query": INSTRUCTION, "document": ""}
        (dst / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return dst


INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("encoders")
    jobs = [(name, p) for name, case in CASES.items() for p in case[3]]
    sources = {name: checkpoint(name, tmp_path_factory.mktemp(name)) for name in CASES}

    def run(job: tuple[str, str]) -> tuple[str, str, int, str]:
        name, precision = job
        r = export(sources[name], CASES[name][0], precision, f"{name}-{precision}", state)
        return name, precision, r.returncode, r.stderr[-3000:]

    with ThreadPoolExecutor(2) as pool:
        for name, precision, code, err in pool.map(run, jobs):
            assert code == 0, (name, precision, err)
    return state


@pytest.mark.parametrize(("name", "precision"), [(n, p) for n, case in CASES.items() for p in case[3]])
def test_an_encoder_exports_and_passes_the_gate(encoders: Path, name: str, precision: str) -> None:
    task, pooling, normalize, _ = CASES[name]
    m = ModelStore(encoders).manifest(f"{name}-{precision}")
    assert m.task == task and m.precision == precision and m.validation["passed"], m.validation
    figures = m.validation["figures"]
    assert figures["batch_invariance_max_abs_diff"] == 0.0
    if pooling is not None:
        assert m.runtime["pooling"] == POOLED[pooling] and m.runtime["normalize"] is normalize
        assert figures["min_cosine"] >= (0.9999 if precision == "fp32" else 0.99), figures


@pytest.fixture(scope="module")
def encoder_daemon(encoders: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    quiet = {"LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_MDNS": "false"}  # these models only
    d = start_daemon(encoders, tmp_path_factory.mktemp("encoders-run"), env=quiet)
    yield d
    d.stop()


def _embed(d: Daemon, **body: Any) -> tuple[int, Any]:
    return http_json(d, "/v1/embeddings", {"model": "qwen3-embed-fp32"} | body, timeout=60)


def test_a_decoder_embedder_puts_its_instruction_before_queries(encoder_daemon: Daemon) -> None:
    """The model's sentence-transformers prompts are in its manifest; ``input_type: "query"`` (Cohere's,
    Voyage's name) and ``prompt_name: "query"`` (sentence-transformers') embed the query after the
    instruction, exactly as the instruction written out by hand does; a document goes as it is."""
    m = ModelStore(encoder_daemon.state_dir).manifest("qwen3-embed-fp32")
    assert m.runtime["prompts"] == {"query": INSTRUCTION, "document": ""}
    text = "how many legs has a cat"

    def vector(**body: Any) -> list[float]:
        status, out = _embed(encoder_daemon, **body)
        assert status == 200, out
        return list(out["data"][0]["embedding"])

    by_hand = vector(input=INSTRUCTION + text)
    assert vector(input=text, input_type="query") == by_hand == vector(input=text, prompt_name="query")
    assert vector(input=text, input_type="document") == vector(input=text) != by_hand
    status, out = _embed(encoder_daemon, input=text, prompt_name="question")
    assert status == 400 and "its prompts: document, query" in out["error"]["message"], out
    status, out = _embed(encoder_daemon, input=[[1, 2, 3]], input_type="query")
    assert status == 400 and out["error"]["param"] == "input", out
