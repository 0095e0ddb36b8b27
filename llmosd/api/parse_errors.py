"""aiohttp's answer to a request its HTTP parser cannot read, made safe for a LAN.

aiohttp answers such a request itself, before any middleware: a plain-text 400 that echoes the offending
line (an ``Authorization: Bearer …`` header with a stray control character included) and an ERROR with a
traceback holding the same line, for every request, from any address. It has no hook for either, so each
connection's handler is a subclass that answers a JSON 400 naming only the parser's reason, and logs that
reason once per client address per ``EVERY_S``, with no traceback and nothing the client sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from llmosd.logs import printable

log = logging.getLogger("llmosd.api")
EVERY_S = 60.0  # one line per client address per minute; the rest are counted into the next line
MAX_CLIENTS = 4096  # addresses remembered; past it the oldest are forgotten (at worst one more line each)
# The parser's reason ends where it starts quoting what it read ("Invalid header value char:\n b'…'",
# "Bad status line 'GET /?token=…'", "Got more than 8190 bytes when reading: b'…'").
_REASON = re.compile(r"[^:'\"\n]*")


def reason_of(exc: HttpProcessingError) -> str:
    """What the parser objected to, without any of the bytes it read."""
    match = _REASON.match(str(exc.message or ""))
    reason = match.group().strip() if match else ""
    return printable(reason, 100) or type(exc).__name__


class ParseErrorLog:
    """Rate-limited lines for malformed requests, shared by every connection of one daemon."""

    def __init__(self, every_s: float = EVERY_S) -> None:
        self.every_s = every_s
        self.total = 0
        self._clients: dict[str, tuple[float, int]] = {}  # address: (last line's time, requests since)

    def report(self, address: str | None, reason: str) -> None:
        self.total += 1
        who = address or "the Unix socket"
        now = time.monotonic()
        last, since = self._clients.pop(who, (-self.every_s, 0))
        if now - last < self.every_s:
            self._clients[who] = (last, since + 1)
            return
        if len(self._clients) >= MAX_CLIENTS:
            del self._clients[next(iter(self._clients))]
        self._clients[who] = (now, 0)
        more = f" ({since} more from it since the last line)" if since else ""
        log.warning("refused a malformed HTTP request from %s: %s%s", printable(who), reason, more)


class QuietHandler(web.RequestHandler):
    """aiohttp's handler, but for the answer and the log line of a request its parser refused."""

    errors: ParseErrorLog

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        reason = reason_of(exc)
        self.errors.report(request.remote, reason)
        text = f"malformed HTTP request: {reason}"
        body = json.dumps({"error": {"type": "invalid_request_error", "message": text}})
        response = web.Response(status=status, text=body, content_type="application/json")
        response.force_close()
        return response


def handlers(server: web.Server, errors: ParseErrorLog) -> Callable[[], web.RequestHandler]:
    """What ``server()`` makes, as QuietHandlers. aiohttp's Server builds its handlers from keyword
    arguments it keeps privately (``_kwargs``); they are read once here."""
    kwargs: dict[str, Any] = dict(server._kwargs)

    def make() -> web.RequestHandler:
        handler = QuietHandler(server, loop=asyncio.get_running_loop(), **kwargs)
        handler.errors = errors
        return handler

    return make
