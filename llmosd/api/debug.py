"""Debug-only routes, registered when ``debug_api = true`` (off by default): they exist to prove
what the service manager does when the daemon misbehaves."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from llmosd.api.errors import bad_request
from llmosd.api.requests import json_body

log = logging.getLogger("llmosd.api")
routes = web.RouteTableDef()
MAX_BLOCK_S = 600.0


@routes.post("/api/debug/block-loop")
async def block_loop(request: web.Request) -> web.Response:
    """Block the event loop for ``{"seconds": N}``: no request is answered and no watchdog ping goes out
    meanwhile, as in a real hang (under systemd the watchdog then kills and restarts the service)."""
    body = await json_body(request)
    seconds = body.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_BLOCK_S:
        raise bad_request(f"seconds must be a number in (0, {MAX_BLOCK_S:g}]", "seconds")
    log.warning("debug: blocking the event loop for %g s on purpose", seconds)
    time.sleep(seconds)  # on the loop thread, deliberately
    return web.json_response({"blocked_s": seconds})
