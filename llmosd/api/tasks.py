"""What a task's routes are built from (the built-in tasks' and a plugin's alike): parse a body, hold a
model of the task, run inputs through its batcher under the request's priority and deadline, answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web

from llmosd.api.errors import ApiError, bad_request
from llmosd.api.metrics import MODEL_KEY
from llmosd.api.openapi import GEN_HEADERS, IDS, MODEL_ERRORS, TEXTS, TRUNCATE, operation, text_request
from llmosd.api.requests import (
    deadline,
    json_body,
    keep_alive_of,
    model_of,
    priority_of,
    texts_of,
    timeout_of,
    truncate_of,
)
from llmosd.api.state import hold, state
from llmosd.config import Config
from llmosd.runtime import Output
from llmosd.scheduler import ServedModel

__all__ = [
    "GEN_HEADERS",
    "IDS",
    "MODEL_ERRORS",
    "TEXTS",
    "TRUNCATE",
    "ApiError",
    "Config",
    "bad_request",
    "encoder_request",
    "list_response",
    "model_of",
    "operation",
    "served_for",
    "text_request",
    "texts_of",
    "truncate_of",
]


async def served_for(request: web.Request, name: str, task: str, body: dict[str, Any]) -> ServedModel:
    """The model ``name``, held for this request; a model of another task is a 400."""
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


def list_response(model: str, data: list[dict[str, Any]], outputs: list[Output]) -> web.Response:
    """OpenAI's list shape with its token usage."""
    tokens = sum(o.tokens for o in outputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": data, "model": model, "usage": usage}
    # orjson writes a float32 array as its shortest round-trip digits, in C: 14 us for a 384-wide
    # vector where json.dumps of its float64 list took 250 (a fifth of the event loop at 250 requests/s).
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")


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
    priority, deadline and ``truncate`` applied). ``parse`` raises ApiError (bad_request) on bad input."""
    body = await json_body(request)
    req = parse(body, state(request).config)
    priority, timeout = priority_of(request, body), timeout_of(request)
    served = await served_for(request, req.model, task, body)
    return req, served, lambda inputs: infer(served, inputs, priority, timeout, req.truncate)
