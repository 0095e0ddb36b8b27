"""Turn untrusted JSON bodies into typed requests; everything below the API sees only these."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from llmosd.api.errors import ApiError, bad_request
from llmosd.config import Config
from llmosd.scheduler.priority import NORMAL, parse_priority


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # aiohttp enforces client_max_size here (413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    if not text.strip():
        raise bad_request("request body is empty; send a JSON object")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise bad_request(f"request body is not valid JSON: {exc.msg} at {where}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", "model")
    return model


def _texts(body: dict[str, Any], limits: Config) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        texts = value
    elif isinstance(value, list) and value and all(isinstance(x, int | list) for x in value):
        raise bad_request("token arrays are not supported as 'input': send the text", "input")
    elif value is None:
        raise bad_request("'input' is required: a string or a list of strings", "input")
    else:
        raise bad_request("'input' must be a non-empty string or a non-empty list of strings", "input")
    if len(texts) > limits.max_inputs:
        raise bad_request(f"too many inputs: {len(texts)} > {limits.max_inputs}", "input")
    for i, text in enumerate(texts):
        if not text.strip():
            raise bad_request(f"input {i} is empty", "input")
        if len(text) > limits.max_input_chars:
            raise bad_request(f"input {i} is longer than {limits.max_input_chars} characters", "input")
    return texts


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> EmbeddingsRequest:
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise bad_request("'dimensions' must be a positive integer", "dimensions")
        return cls(_model(body), _texts(body, limits), fmt, dims)


@dataclass(frozen=True)
class ClassifyRequest:
    model: str
    texts: list[str]
    top_k: int | None

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> ClassifyRequest:
        top_k = body.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise bad_request("'top_k' must be a positive integer", "top_k")
        return cls(_model(body), _texts(body, limits), top_k)


def priority_of(request: web.Request, body: dict[str, Any]) -> int:
    """``X-Priority`` or the body's ``priority``: high, normal (default) or low."""
    value = request.headers.get("X-Priority", body.get("priority"))
    if value is None:
        return NORMAL
    if not isinstance(value, str):
        raise bad_request("'priority' must be one of high, normal, low", "priority")
    try:
        return parse_priority(value)
    except ValueError as exc:
        raise bad_request(str(exc), "priority") from None


def timeout_of(request: web.Request) -> float | None:
    """``X-Request-Timeout`` in seconds: past it the request is dropped and answered 504."""
    raw = request.headers.get("X-Request-Timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise bad_request("X-Request-Timeout must be a number of seconds in (0, 3600]", "X-Request-Timeout")
    return seconds


@contextlib.asynccontextmanager
async def deadline(seconds: float | None) -> AsyncIterator[None]:
    """Cancel what runs inside after ``seconds`` (the schedulers skip or drop cancelled work) and answer 504."""
    if seconds is None:
        yield
        return
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise ApiError(
            504, f"the request did not finish within its X-Request-Timeout of {seconds:g} s", type="timeout_error"
        ) from None


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_of(body: dict[str, Any]) -> float | None:
    """Ollama's ``keep_alive``: seconds or a duration ("30s", "5m", "1h"); negative keeps the model
    loaded for good, 0 unloads it once idle. None: the daemon's default."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if text and text[-1] in _UNITS:
                return float(text[:-1]) * _UNITS[text[-1]]
            return float(text)
        except ValueError:
            pass
    raise bad_request('\'keep_alive\' must be seconds or a duration like "30s", "5m", "1h" (-1: forever)', "keep_alive")
