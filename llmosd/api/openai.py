"""OpenAI-compatible routes (/v1/...) plus /v1/classify, which OpenAI has no route for."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson
from aiohttp import web

from llmosd.api.errors import ApiError, bad_request
from llmosd.api.metrics import MODEL_KEY
from llmosd.api.requests import (
    ClassifyRequest,
    EmbeddingsRequest,
    deadline,
    json_body,
    keep_alive_of,
    priority_of,
    timeout_of,
)
from llmosd.api.state import hold, state
from llmosd.config import Config
from llmosd.runtime import Output
from llmosd.scheduler import GenerationEngine, ServedModel
from llmosd.store import Manifest

routes = web.RouteTableDef()


def _created(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def _manifest_card(m: Manifest) -> dict[str, Any]:
    return {
        "id": m.name,
        "object": "model",
        "created": _created(m.created),
        "owned_by": "llmosd",
        "task": m.task,
        "version": m.version,
        "precision": m.precision,
    }


def _model_card(served: ServedModel) -> dict[str, Any]:
    card = _manifest_card(served.manifest) | {"devices": served.devices}
    engine = served.instances[0].worker
    if isinstance(engine, GenerationEngine):
        card["context_length"] = engine.model.context_length
        card["chat_template"] = engine.model.chat is not None
    return card


async def served_for(request: web.Request, name: str, task: str, body: dict[str, Any]) -> ServedModel:
    request[MODEL_KEY] = name
    served = await hold(request, name, keep_alive_of(body))
    if served.loaded.manifest.task != task:
        raise ApiError(400, f"model {name!r} is a {served.loaded.manifest.task} model, not {task}", param="model")
    return served


async def infer(
    served: ServedModel, inputs: list[Any], priority: int, timeout: float | None, truncate: bool
) -> list[Output]:
    """The batcher's outputs for these inputs (an input the model cannot take raises InvalidInput: a 400)."""
    async with deadline(timeout):
        return await served.infer(inputs, priority, truncate)


def _list_response(model: str, data: list[dict[str, Any]], outputs: list[Output]) -> web.Response:
    tokens = sum(o.tokens for o in outputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": data, "model": model, "usage": usage}
    # orjson writes a float32 array as its shortest round-trip digits, in C: 14 us for a 384-wide
    # vector where json.dumps of its float64 list took 250 (a fifth of the event loop at 250 requests/s).
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Loaded models with their devices, then the store's other active models (loaded on first use)."""
    st = state(request)
    cards = [_model_card(s) | {"loaded": True} for s in st.pool.served()]
    loaded = {c["id"] for c in cards}

    def stored() -> list[dict[str, Any]]:  # in a thread: a file-system walk, as long as the store is
        names = [n for n in st.store.names() if n not in loaded and st.store.active_version(n)]
        return [_manifest_card(st.store.manifest(n)) | {"loaded": False} for n in names]

    cards += await asyncio.to_thread(stored)
    return web.json_response({"object": "list", "data": cards})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    """One model's card; a model in the store but not loaded is loaded now (the client's load_model)."""
    return web.json_response(_model_card(await hold(request, request.match_info["model"])) | {"loaded": True})


class _Parsed(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def truncate(self) -> bool: ...


R = TypeVar("R", bound=_Parsed)


async def encoder_request(
    request: web.Request, parse: Callable[[dict[str, Any], Config], R], task: str
) -> tuple[R, ServedModel, Callable[[list[Any]], Awaitable[list[Output]]]]:
    """An encoder route's typed request, its model (of ``task``), and how to run inputs through it (its
    priority, deadline and ``truncate`` applied)."""
    body = await json_body(request)
    req = parse(body, state(request).config)
    priority, timeout = priority_of(request, body), timeout_of(request)
    served = await served_for(request, req.model, task, body)
    return req, served, lambda inputs: infer(served, inputs, priority, timeout, req.truncate)


def _width(served: ServedModel, model: str, asked: int | None) -> int | None:
    """Where to cut the vectors: None for the model's own width; a smaller ``dimensions`` only for a model
    exported as trained for it (``--option matryoshka=...``)."""
    runtime = served.loaded.manifest.runtime
    dims = int(runtime.get("dimensions") or 0)
    if asked is None or asked == dims:
        return None
    trained = runtime.get("matryoshka_dimensions")
    if not trained:
        why = f"model {model!r} produces {dims} dimensions and was not exported as trained for fewer"
        raise bad_request(
            f"{why} (llmosd export --option matryoshka=...): 'dimensions' cannot change that", "dimensions"
        )
    if asked > dims:
        raise bad_request(
            f"model {model!r} produces {dims} dimensions: 'dimensions' must be at most that", "dimensions"
        )
    return asked


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    req, served, run = await encoder_request(request, EmbeddingsRequest.parse, "feature-extraction")
    width = _width(served, req.model, req.dimensions)
    outputs = await run(req.texts)
    data = []
    for i, out in enumerate(outputs):
        vec = out.values.astype("<f4", copy=False)
        if width is not None:  # a Matryoshka model's leading dimensions, renormalised (as OpenAI's)
            vec = vec[:width] / max(float(np.linalg.norm(vec[:width])), 1e-12)
        emb: Any = base64.b64encode(vec.tobytes()).decode() if req.encoding_format == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return _list_response(req.model, data, outputs)


@routes.post("/v1/classify")
async def classify(request: web.Request) -> web.Response:
    req, served, run = await encoder_request(request, ClassifyRequest.parse, "text-classification")
    labels: list[str] = list(served.loaded.manifest.runtime["labels"])
    outputs = await run(req.texts)
    data = []
    for i, out in enumerate(outputs):
        order = np.argsort(-out.values)[: req.top_k or len(labels)]
        scores = [{"label": labels[j], "score": float(out.values[j])} for j in order]
        data.append(
            {
                "object": "classification",
                "index": i,
                "label": scores[0]["label"],
                "score": scores[0]["score"],
                "scores": scores,
            }
        )
    return _list_response(req.model, data, outputs)
