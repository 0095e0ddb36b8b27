"""The text-ranking task: POST /v1/rerank and /rerank. A cross-encoder scores each (query, document) pair,
and the documents come back best first, in the shape llama.cpp's server, vLLM, Jina and TEI share
(``results`` of ``index``, ``relevance_score`` and the ``document``). The pairs go through the model's
batcher like embeddings do."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from llmosd.api.errors import ApiError
from llmosd.api.openapi import NOT_BLANK
from llmosd.api.state import STATE
from llmosd.api.tasks import (
    GEN_HEADERS,
    MODEL_ERRORS,
    TRUNCATE,
    Config,
    bad_request,
    encoder_request,
    model_of,
    operation,
    truncate_of,
)
from llmosd.runtime.adapters import Adapting
from llmosd.runtime.tasks import RankingModel
from llmosd.store import ModelStore, NotFound
from llmosd.tasks.contract import INVARIANT, Export, Source, Task, Tolerance, deferred

NAME = "text-ranking"
routes = web.RouteTableDef()


@dataclass(frozen=True)
class RerankRequest:
    """The rerank shape llama.cpp, vLLM, Jina and TEI share: a query, documents (strings or ``{"text"}``),
    ``top_n``, ``return_documents``; or TEI's own (``texts``, ``return_text``, ``raw_scores``, no model
    where the box has one reranker), answered in TEI's shape."""

    model: str  # "" in TEI's shape without one: the store's only text-ranking model
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    truncate: bool
    tei: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> RerankRequest:
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise bad_request("'query' is required and must be a non-empty string", "query")
        if len(query) > limits.max_input_chars:
            raise bad_request(f"'query' is longer than {limits.max_input_chars} characters", "query")
        tei = "texts" in body and "documents" not in body
        texts = _documents(body.get("texts" if tei else "documents"), limits, "texts" if tei else "documents")
        top_n = body.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise bad_request("'top_n' must be a positive integer", "top_n")
        key = "return_text" if tei else "return_documents"
        back = body.get(key, not tei)  # TEI leaves the text out unless asked; the others send it back
        if not isinstance(back, bool):
            raise bad_request(f"'{key}' must be true or false", key)
        raw = body.get("raw_scores", False)
        if not isinstance(raw, bool):
            raise bad_request("'raw_scores' must be true or false", "raw_scores")
        if raw:
            raise bad_request(
                "'raw_scores' is not supported: the score served is the one the export validated against "
                "PyTorch (the sigmoid, or the softmax, of the model's logits), not the logits",
                "raw_scores",
            )
        model = model_of(body) if not tei or body.get("model") is not None else ""
        return cls(model, query, texts, top_n, back, truncate_of(body), tei)


def _documents(docs: Any, limits: Config, key: str) -> list[str]:
    if not isinstance(docs, list) or not docs:
        raise bad_request(f"'{key}' must be a non-empty list of strings or {{\"text\": ...}} objects", key)
    if len(docs) > limits.max_inputs:
        raise bad_request(f"too many documents: {len(docs)} > {limits.max_inputs}", key)
    texts = []
    for i, d in enumerate(docs):
        text = d.get("text") if isinstance(d, dict) else d
        if not isinstance(text, str) or not text.strip():
            raise bad_request(f'document {i} must be a non-empty string or {{"text": ...}}', key)
        if len(text) > limits.max_input_chars:
            raise bad_request(f"document {i} is longer than {limits.max_input_chars} characters", key)
        texts.append(text)
    return texts


def _only_reranker(store: ModelStore) -> str:
    """TEI serves one model and its clients name none: the store's only text-ranking model, if it has one."""
    found = []
    for name in store.names():
        with contextlib.suppress(NotFound):
            if store.manifest(name).task == NAME:
                found.append(name)
    if not found:
        raise ApiError(404, "no 'model' named, and the box holds no reranker (a text-ranking model)", param="model")
    if len(found) > 1:
        held = f"it holds {len(found)}: {', '.join(found)}"
        raise bad_request(f"'model' is required unless the box holds exactly one reranker ({held})", "model")
    return found[0]


@routes.post("/v1/rerank")
@routes.post("/rerank")
async def rerank(request: web.Request) -> web.Response:
    req, _, run = await encoder_request(request, _parser(request), NAME)
    outputs = await run([(req.query, d) for d in req.documents])
    order = sorted(range(len(outputs)), key=lambda i: -float(outputs[i].values[0]))[: req.top_n]
    if req.tei:  # TEI's answer: a bare list, best first
        items: list[dict[str, object]] = []
        for i in order:
            item: dict[str, object] = {"index": i, "score": float(outputs[i].values[0])}
            if req.return_documents:
                item["text"] = req.documents[i]
            items.append(item)
        return web.json_response(items)
    results = []
    for i in order:
        result: dict[str, object] = {"index": i, "relevance_score": float(outputs[i].values[0])}
        if req.return_documents:
            result["document"] = {"text": req.documents[i]}
        results.append(result)
    tokens = sum(o.tokens for o in outputs)
    return web.json_response(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "list",
            "model": req.model,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _parser(request: web.Request) -> Callable[[dict[str, Any], Config], RerankRequest]:
    """RerankRequest.parse, with TEI's missing model resolved to the store's only reranker."""
    store = request.app[STATE].store

    def parse(body: dict[str, Any], limits: Config) -> RerankRequest:
        req = RerankRequest.parse(body, limits)
        return replace(req, model=_only_reranker(store)) if not req.model else req

    return parse


_DOCUMENTS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "oneOf": [
            {"type": "string", "pattern": NOT_BLANK},
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "pattern": NOT_BLANK}}},
        ]
    },
}
_BODY = {
    "type": "object",
    "required": ["query"],
    # llama.cpp's, vLLM's, Jina's: a model and documents; TEI's: texts (and a model where the box has more
    # than one reranker)
    "anyOf": [{"required": ["model", "documents"]}, {"required": ["texts"], "not": {"required": ["documents"]}}],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "query": {"type": "string", "pattern": NOT_BLANK},
        "documents": _DOCUMENTS,
        "texts": _DOCUMENTS,
        "top_n": {"type": "integer", "minimum": 1},
        "return_documents": {"type": "boolean"},
        "return_text": {"type": "boolean"},
        "raw_scores": {"const": False},
        "truncate": TRUNCATE,
    },
}
_ANSWER = {
    "anyOf": [
        {"type": "object", "required": ["model", "results", "usage"]},
        {"type": "array", "items": {"type": "object", "required": ["index", "score"]}},  # TEI's shape
    ]
}
PATHS = {
    path: {
        "post": operation(
            "Rerank documents against a query with a cross-encoder (llama.cpp / vLLM / Jina / TEI shape)",
            ok=_ANSWER,
            body=_BODY,
            errors=(*MODEL_ERRORS, 504),
            headers=GEN_HEADERS,
        )
    }
    for path in ("/v1/rerank", "/rerank")
}


def adapter(a: Adapting) -> RankingModel:
    return RankingModel(a.session, a.tokenizer(), str(a.setting("score")))


def score_settings(src: Source) -> dict[str, Any]:
    """How a cross-encoder's logits become a relevance score: one label, its sigmoid (sentence-transformers'
    CrossEncoder); two, the second's softmax (binary rerankers); more is not a reranker."""
    labels = int(src.config.get("num_labels") or len(src.config.get("id2label") or {}) or 1)
    if labels not in (1, 2):
        raise ValueError(f"a reranker has one or two labels; this model has {labels}: export it as text-classification")
    return {"score": "sigmoid" if labels == 1 else "softmax"}


# Cross-encoders (rerankers): sequence classification over (query, document) pairs, one relevance score
# each. The gate is on the scores the daemon serves (after sigmoid or softmax).
TASK = Task(
    name=NAME,
    summary="Rerank documents against a query with a cross-encoder (/v1/rerank, /rerank)",
    adapter=adapter,
    export=Export(
        optimum_task="text-classification",
        tolerances={
            "fp32": Tolerance(max_abs_diff=1e-4, batch_invariance=INVARIANT),
            "fp16": Tolerance(max_abs_diff=1e-2, batch_invariance=INVARIANT),
            "int8": Tolerance(max_abs_diff=0.05, batch_invariance=INVARIANT),
        },
        settings=score_settings,
        reference=deferred("exporters.references:ranking_reference"),
        figures=deferred("exporters.references:max_abs_diff"),
        pairs=True,
    ),
    routes=routes,
    paths=PATHS,
)
