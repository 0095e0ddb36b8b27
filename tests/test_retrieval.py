"""Retrieval on tiny random models served by a real daemon of their own. Reranking with a cross-encoder
(a BertForSequenceClassification with one label, what sentence-transformers' CrossEncoder loads)
exported as text-ranking and validated against PyTorch: POST /v1/rerank and /rerank, scores equal to
PyTorch's, sorted, top_n and return_documents, the Python client, bad requests, /metrics. And an
embedding model exported as trained for Matryoshka dimensions: ``dimensions`` cuts and renormalises."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from llmosd import AsyncClient
from tests.conftest import Daemon, export, make_tiny_cross_encoder, start_daemon

pytestmark = pytest.mark.slow  # exports a cross-encoder and checks it against PyTorch

QUERY = "how do lighthouses warn ships at night"
DOCS = [
    "A lighthouse sends a beam of light across the sea so ships can see the coast.",
    "Bread rises because yeast makes carbon dioxide.",
    "Foghorns sound when the light cannot be seen.",
    "The keeper climbed the stairs every evening to light the lamp.",
]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = make_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-rerank-src"))
    state = tmp_path_factory.mktemp("rerank-state")
    r = export(src, "text-ranking", "fp32", "tiny-rerank", state)
    assert r.returncode == 0, r.stderr[-3000:]
    # The same random BERT's encoder as an embedding model (mean pooling), declared Matryoshka-trained.
    r = export(src, "feature-extraction", "fp32", "tiny-mrl", state, "--option", "matryoshka=32,16")
    assert r.returncode == 0, r.stderr[-3000:]
    return src, state


@pytest_asyncio.fixture(scope="module")
async def served(reranker: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    env = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false"}
    d = await asyncio.to_thread(start_daemon, reranker[1], tmp_path_factory.mktemp("rerank-run"), env=env)
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


def pytorch_scores(src: Path, query: str, docs: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(src)
    model = BertForSequenceClassification.from_pretrained(src).eval()
    batch = tok([query] * len(docs), docs, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return torch.sigmoid(model(**batch).logits[:, 0]).numpy()


def test_the_export_is_validated_against_pytorch(reranker: tuple[Path, Path]) -> None:
    manifest = json.loads((reranker[1] / "models" / "tiny-rerank" / "1" / "manifest.json").read_text())
    assert manifest["task"] == "text-ranking" and manifest["runtime"]["score"] == "sigmoid"
    assert manifest["validation"]["passed"] and manifest["validation"]["figures"]["max_abs_diff"] < 1e-4


async def test_rerank_scores_are_pytorchs_and_come_back_best_first(reranker: tuple[Path, Path], served: Daemon) -> None:
    expected = pytorch_scores(reranker[0], QUERY, DOCS)
    docs: list[Any] = [DOCS[0], {"text": DOCS[1]}, DOCS[2], {"text": DOCS[3]}]  # both shapes Jina and vLLM take
    async with aiohttp.ClientSession(served.url) as s:
        async with s.post("/v1/rerank", json={"model": "tiny-rerank", "query": QUERY, "documents": docs}) as r:
            body = await r.json()
            assert r.status == 200, body
        async with s.post(
            "/rerank",
            json={"model": "tiny-rerank", "query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False},
        ) as r:
            top = await r.json()
            assert r.status == 200, top
        async with s.get("/metrics") as r:
            metrics = await r.text()
    results = body["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2, 3]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    for x in results:
        assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-5
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert body["usage"]["total_tokens"] > 4 * len(QUERY.split())
    assert [x["index"] for x in top["results"]] == [x["index"] for x in results[:2]]
    assert all("document" not in x for x in top["results"])
    assert 'llmosd_inference_items_total{model="tiny-rerank"} ' in metrics
    assert 'route="/v1/rerank"' in metrics and 'route="/rerank"' in metrics


async def test_teis_own_rerank_shape(reranker: tuple[Path, Path], served: Daemon) -> None:
    """TEI's /rerank as TEI documents it: ``texts``, ``return_text``, ``raw_scores``, ``truncate``, no model
    (the box's only reranker answers), and a bare list of ``index`` and ``score`` back, best first."""
    expected = pytorch_scores(reranker[0], QUERY, DOCS)
    async with aiohttp.ClientSession(served.url) as s:
        async with s.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": False, "truncate": False}) as r:
            plain = await r.json()
            assert r.status == 200, plain
        async with s.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}) as r:
            texts = await r.json()
        async with s.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}) as r:
            raw = await r.json()
            assert r.status == 400 and "raw_scores" in raw["error"]["message"], raw
    assert sorted(x["index"] for x in plain) == [0, 1, 2, 3] and all(set(x) == {"index", "score"} for x in plain)
    assert [x["score"] for x in plain] == sorted((x["score"] for x in plain), reverse=True)
    assert all(abs(x["score"] - expected[x["index"]]) < 1e-5 for x in plain)
    assert [x["text"] for x in texts] == [DOCS[x["index"]] for x in plain]


async def test_the_client_reranks(served: Daemon) -> None:
    async with AsyncClient(socket=served.socket) as client:
        model = await client.load_model("tiny-rerank")
        results = await model.rerank(QUERY, DOCS, top_n=3)
    assert len(results) == 3 and results[0]["relevance_score"] >= results[-1]["relevance_score"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"documents": DOCS}, "'query'"),
        ({"query": QUERY}, "'documents'"),
        ({"query": QUERY, "documents": []}, "'documents'"),
        ({"query": QUERY, "documents": [{"txt": "x"}]}, "document 0"),
        ({"query": QUERY, "documents": DOCS, "top_n": 0}, "'top_n'"),
        ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "'return_documents'"),
        ({"query": QUERY, "documents": ["word " * 300]}, "'truncate': true"),
        ({"model": "nope", "query": QUERY, "documents": DOCS}, "not loaded"),
    ],
)
async def test_bad_rerank_requests(served: Daemon, body: dict[str, Any], needle: str) -> None:
    async with aiohttp.ClientSession(served.url) as s:
        async with s.post("/v1/rerank", json={"model": "tiny-rerank", **body}) as r:
            payload = await r.json()
        assert r.status in (400, 404) and needle in payload["error"]["message"], payload
        long = {"model": "tiny-rerank", "query": QUERY, "documents": ["word " * 300], "truncate": True}
        async with s.post("/v1/rerank", json=long) as r:
            assert r.status == 200  # cut at the model's 128 tokens, as asked


def test_matryoshka_dimensions_are_declared_at_export_and_checked(reranker: tuple[Path, Path], tmp_path: Path) -> None:
    manifest = json.loads((reranker[1] / "models" / "tiny-mrl" / "1" / "manifest.json").read_text())
    assert manifest["runtime"]["dimensions"] == 32 and manifest["runtime"]["matryoshka_dimensions"] == [32, 16]
    r = export(reranker[0], "feature-extraction", "fp32", "tiny-bad", tmp_path, "--option", "matryoshka=64")
    assert r.returncode != 0 and "matryoshka=64" in r.stderr


async def test_dimensions_cut_a_matryoshka_models_vectors_and_renormalise(served: Daemon) -> None:
    async with aiohttp.ClientSession(served.url) as s:
        async with s.post("/v1/embeddings", json={"model": "tiny-mrl", "input": DOCS}) as r:
            full = np.array([d["embedding"] for d in (await r.json())["data"]])
        async with s.post("/v1/embeddings", json={"model": "tiny-mrl", "input": DOCS, "dimensions": 16}) as r:
            cut = np.array([d["embedding"] for d in (await r.json())["data"]])
        async with s.post("/v1/embeddings", json={"model": "tiny-mrl", "input": "a", "dimensions": 33}) as r:
            wider = await r.json()
            assert r.status == 400
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert cut.shape == (len(DOCS), 16) and np.allclose(cut, expected, atol=1e-6)
    assert "at most" in wider["error"]["message"] and wider["error"]["param"] == "dimensions"
