"""One request forwarded to an upstream, its answer passed back as it comes (streams unchanged).

A request is sent at most once to one upstream. What the caller may try elsewhere is what the upstream
did not accept: no connection (``NotAccepted``), or an answer refusing it before any work (429, 503).
Anything after the upstream took it (a 4xx about the request, a 5xx, a cut) ends there."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from llmosd.logs import REQUEST_ID
from llmosd.routing.upstreams import Upstream
from llmosd.routing.usage import Tally

CONNECT_S = 5.0
ERROR_BODY_BYTES = 64 << 10  # the most of an upstream's error body read to name its message
HOP = "X-Llmosd-Hop"  # set on what we forward: a request that carries it is served where it lands
# the request headers that travel (never the client's Authorization: each upstream gets its own)
SENT = ("Content-Type", "Accept", "OpenAI-Organization", "OpenAI-Project")
KEPT = ("Content-Type", "Cache-Control", "Retry-After", "X-Request-Id")  # of the answer, besides X-Ratelimit-*
REFUSED = (429, 503)  # an upstream that answers these did not take the request


log = logging.getLogger(__name__)


class NotAccepted(Exception):
    """The upstream did not take the request: it may go elsewhere, unchanged."""

    def __init__(self, upstream: Upstream, why: str, status: int = 503, retry_after: str = "") -> None:
        super().__init__(f"{upstream.route}: {why}")
        self.upstream, self.why, self.status, self.retry_after = upstream, why, status, retry_after
        self.connect = status == 503 and not retry_after  # no answer at all: the upstream is down


class UpstreamFailed(Exception):
    """The upstream took the request and answered an error: it goes back to the client, named."""

    def __init__(self, upstream: Upstream, status: int, message: str, type: str) -> None:
        super().__init__(message)
        self.upstream, self.status, self.message, self.type = upstream, status, message, type


def upstream_message(status: int, body: bytes, route: str) -> tuple[int, str, str]:
    """The status, message and type the client gets for an upstream's error answer: a mistake in the
    request keeps its 4xx; the upstream's own trouble (5xx, or refusing our credentials) is a 502."""
    message, kind = "", ""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict):  # OpenAI's, vLLM's, llama-server's and llmosd's shape
        message, kind = str(error.get("message", "")), str(error.get("type", ""))
    elif isinstance(error, str):  # KServe's, FastAPI's "detail" aside
        message = error
    if not message:
        message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    message = "".join(c if c.isprintable() else " " for c in message)[:2000]  # it may reach the journal
    if status in (401, 403):
        return 502, f"{route} refused llmosd's credentials ({status}): {message}", "upstream_error"
    if status >= 500:
        return 502, f"{route} failed ({status}): {message}", "upstream_error"
    return status, f"{route}: {message}", kind or "invalid_request_error"


async def _head(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body's first ``limit`` bytes (``read(n)`` gives what has arrived, perhaps one segment)."""
    data = b""
    while len(data) < limit and (chunk := await answer.content.read(limit - len(data))):
        data += chunk
    return data


def _kept(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.title() in KEPT or k.lower().startswith("x-ratelimit-")}


async def forward(
    session: aiohttp.ClientSession,
    request: web.Request,
    body: bytes,
    upstream: Upstream,
    hop: str,
    tally: Tally | None = None,
) -> web.StreamResponse:
    """Send ``body`` to the upstream's version of the request's path and stream its answer back; a
    ``tally`` reads, on the way, how many tokens the answer says were generated."""
    headers = {k: v for k in SENT if (v := request.headers.get(k))} | upstream.headers() | {HOP: hop}
    if request_id := REQUEST_ID.get():
        headers["X-Request-Id"] = request_id  # one id in both journals
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S)
    started = time.monotonic()
    upstream.in_flight += 1
    try:
        try:
            answer = await session.post(
                upstream.url(request.path), data=body, headers=headers, timeout=timeout, ssl=upstream.ssl
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            # ClientConnectorError and a TLS failure happen before a byte of the request is sent; a
            # connection reused from the pool that turns out closed is retried by aiohttp itself
            raise NotAccepted(upstream, str(exc) or type(exc).__name__) from None
        async with answer:
            upstream.sent += 1
            upstream.answered(time.monotonic() - started)
            if answer.status in REFUSED:
                retry = answer.headers.get("Retry-After", "1")
                raise NotAccepted(upstream, f"answered {answer.status}", answer.status, retry)
            if answer.status >= 400:
                text = await _head(answer, ERROR_BODY_BYTES)
                raise UpstreamFailed(upstream, *upstream_message(answer.status, text, upstream.route))
            response = web.StreamResponse(status=answer.status, headers=_kept(answer.headers))
            if answer.content_length is not None and answer.headers.get("Content-Encoding", "identity") == "identity":
                # a whole answer keeps its length (a compressed one is passed on decompressed: chunked)
                response.content_length = answer.content_length
            await response.prepare(request)
            if tally is not None:
                tally.begin(answer.headers.get("Content-Type", ""))
            try:
                async for chunk in answer.content.iter_any():
                    if tally is not None:
                        tally.feed(chunk)
                    await response.write(chunk)
            except aiohttp.ClientError as exc:
                # too late for an error answer: cut the client's connection too, so that it sees an
                # unfinished answer rather than a short one that looks complete
                log.warning("%s broke off its answer to %s: %s", upstream.route, request.path, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            finally:
                if tally is not None:  # what was generated is spent, even if the client left mid-stream
                    tally.close()
            await response.write_eof()
            return response
    finally:
        upstream.in_flight -= 1
