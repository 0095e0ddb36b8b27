"""POST /v1/rerank and /rerank: a cross-encoder scores each (query, document) pair, and the documents
come back best first, in the shape llama.cpp's server, vLLM, Jina and TEI share (``results`` of
``index``, ``relevance_score`` and the ``document``). The pairs go through the model's batcher like
embeddings do."""

from __future__ import annotations

import uuid

from aiohttp import web

from llmosd.api.openai import encoder_request
from llmosd.api.requests import RerankRequest

routes = web.RouteTableDef()


@routes.post("/v1/rerank")
@routes.post("/rerank")
async def rerank(request: web.Request) -> web.Response:
    req, _, run = await encoder_request(request, RerankRequest.parse, "text-ranking")
    outputs = await run([(req.query, d) for d in req.documents])
    order = sorted(range(len(outputs)), key=lambda i: -float(outputs[i].values[0]))[: req.top_n]
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
