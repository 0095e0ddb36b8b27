"""Debug-only routes, registered when ``debug_api = true`` (off by default): they exist to prove
what the service manager does when the daemon misbehaves."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from llmosd.api.errors import ApiError, bad_request
from llmosd.api.requests import json_body
from llmosd.api.state import state
from llmosd.scheduler.faults import STAGES, inject

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


@routes.post("/api/debug/fault")
async def fault(request: web.Request) -> web.Response:
    """Kill a model's worker at a stage of its loop: ``{"model", "worker": "batcher" | "generation" |
    "tensors", "stage": "collect" | "run" | "deliver", "times": 1}``, to watch supervision work."""
    body = await json_body(request)
    served = state(request).pool.get(str(body.get("model")))
    kind, stage, times = body.get("worker"), body.get("stage"), body.get("times", 1)
    if stage not in STAGES:
        raise bad_request(f"stage must be one of {', '.join(STAGES)}", "stage")
    if isinstance(times, bool) or not isinstance(times, int) or not 1 <= times <= 100:
        raise bad_request("times must be an integer from 1 to 100", "times")
    instance = served.raw.get(0) if kind == "tensors" else served.instances[0]
    worker = instance.worker if instance is not None and instance.worker.role == kind else None
    if worker is None:
        raise ApiError(409, f"model {served.name!r} has no {kind!r} worker running", type="conflict_error")
    log.warning("debug: injecting %d fault(s) into the %s stage of %s's %s worker", times, stage, served.name, kind)
    inject(worker, stage, times)
    return web.json_response({"model": served.name, "worker": kind, "stage": stage, "times": times})
