"""Turn untrusted JSON bodies into typed requests; everything below the API sees only these."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from llmosd.api.decode import decode_json_off_loop
from llmosd.api.errors import ApiError, bad_request
from llmosd.api.state import STATE
from llmosd.config import Config
from llmosd.scheduler.priority import NORMAL, parse_priority

RAW_BODY = "llmosd.raw_body"  # request keys: the body and its JSON, once something read them
JSON_BODY = "llmosd.json_body"


async def read_body(request: web.Request) -> bytes:
    """The whole body, refused early when it cannot fit and cut off when it arrives too slowly.

    A body gets ``body_timeout_s`` of grace, and past it must keep arriving at ``body_min_rate_kb_s``
    on average (nginx's client_body_timeout, as a rate): a stalled or trickled upload is a 408, not a
    descriptor held for minutes. A ``Content-Length`` over the limit is a 413 before anything is read.
    """
    if (read := request.get(RAW_BODY)) is not None:  # read already (the router looked at its model)
        return bytes(read)
    config: Config = request.app[STATE].config
    limit = config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    loop = asyncio.get_running_loop()
    started = loop.time()
    rate = config.body_min_rate_kb_s * 1000
    chunks: list[bytes] = []
    size = 0
    while True:
        allowed = config.body_timeout_s + (size / rate if rate else float("inf"))
        try:
            async with asyncio.timeout_at(started + allowed):
                chunk = await request.content.readany()
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive in time ({size} bytes in {loop.time() - started:.0f} s; "
                f"the minimum rate is {config.body_min_rate_kb_s:g} KB/s after {config.body_timeout_s:g} s)",
                type="timeout_error",
                close=True,
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body too large (limit {limit} bytes)", close=True)


async def json_body(request: web.Request) -> dict[str, Any]:
    body = request[JSON_BODY] if JSON_BODY in request else await decode_json_off_loop(await read_body(request))
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", "model")
    return model


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def texts_of(body: dict[str, Any], limits: Config, ids: bool = False) -> list[Any]:
    """``input``: a string or a list of them; where ``ids``, also OpenAI's token arrays (one list of
    token ids, or a list of them), the model's own ids, taken as sent."""
    value = body.get("input")
    if isinstance(value, str):
        texts: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        texts = value
    elif ids and _is_ids(value):
        texts = [value]
    elif ids and isinstance(value, list) and value and all(_is_ids(x) for x in value):
        texts = value
    elif value is None:
        raise bad_request("'input' is required: a string or a list of strings", "input")
    else:
        kinds = "a string, a list of strings, a list of token ids or a list of them" if ids else "a list of strings"
        raise bad_request(f"'input' must be a non-empty string or {kinds}", "input")
    if len(texts) > limits.max_inputs:
        raise bad_request(f"too many inputs: {len(texts)} > {limits.max_inputs}", "input")
    for i, text in enumerate(texts):
        if isinstance(text, str) and not text.strip():
            raise bad_request(f"input {i} is empty", "input")
        if len(text) > limits.max_input_chars:
            raise bad_request(f"input {i} is longer than {limits.max_input_chars} characters or tokens", "input")
    return texts


def truncate_of(body: dict[str, Any]) -> bool:
    """TEI's ``truncate``: cut an input over the model's limit there (true), or refuse it (false, the default)."""
    value = body.get("truncate", False)
    if not isinstance(value, bool):
        raise bad_request("'truncate' must be true or false", "truncate")
    return value


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


# A decimal number of seconds in (0, 3600], as the OpenAPI document states it (the header is checked
# against this, not against whatever float() takes: "1e3", "5_0", " 5").
TIMEOUT_PATTERN = (
    r"^0*(?:(?:[1-9][0-9]{0,2}|[12][0-9]{3}|3[0-5][0-9]{2})(?:\.[0-9]+)?|3600(?:\.0+)?|\.[0-9]*[1-9][0-9]*)$"
)
_TIMEOUT = re.compile(TIMEOUT_PATTERN)


def timeout_of(request: web.Request) -> float | None:
    """``X-Request-Timeout`` in seconds: past it the request is dropped and answered 504."""
    raw = request.headers.get("X-Request-Timeout")
    if raw is None:
        return None
    seconds = float(raw) if _TIMEOUT.match(raw) else -1.0
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
    seconds = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer past any float
            seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        with contextlib.suppress(ValueError, OverflowError):
            seconds = float(text[:-1]) * _UNITS[text[-1]] if text and text[-1] in _UNITS else float(text)
    if math.isfinite(seconds):
        return seconds
    raise bad_request('\'keep_alive\' must be seconds or a duration like "30s", "5m", "1h" (-1: forever)', "keep_alive")
