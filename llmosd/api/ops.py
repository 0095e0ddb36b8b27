"""Operations routes: liveness, readiness, status, the OpenAPI description."""

from __future__ import annotations

import os
import time

import psutil
from aiohttp import web

from llmosd import __version__
from llmosd.api.errors import error_response
from llmosd.api.lifecycle import PULLS
from llmosd.api.openapi import spec
from llmosd.api.state import AppState, state
from llmosd.tls.server import ServerTls

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    st = state(request)
    if not st.ready:
        return error_response(503, f"not ready: {st.status_line}", "unavailable_error")
    if problems := worker_problems(st):
        return error_response(503, f"not ready: {'; '.join(problems)}", "unavailable_error")
    return web.json_response({"status": "ready"})


def worker_problems(st: AppState) -> list[str]:
    """Models whose worker is down (restarting) or was given up on: the box does not fully serve."""
    down = [f"model {s.name}: a worker died and is restarting" for s in st.pool.served() if not s.healthy()]
    pinned = st.pool.pinned
    lost = [f"model {n} unloaded: {why}" for n, why in sorted(st.pool.failures.items()) if n in pinned]
    return down + lost


def tls_status(tls: ServerTls | None) -> dict[str, object] | None:
    if tls is None or tls.certificate is None:
        return None
    return {"source": tls.source} | tls.certificate.as_dict()


@routes.get("/api/status")
async def status(request: web.Request) -> web.Response:
    st = state(request)
    return web.json_response(
        {
            "version": __version__,
            "id": st.install_id,
            "mdns": st.advertiser.name if st.advertiser is not None else None,
            "peers": [a.name for a in st.advertiser.neighbours()] if st.advertiser is not None else [],
            "ready": st.ready,
            "status": st.status_line,
            "uptime_s": round(time.time() - st.started, 1),
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "listeners": st.listeners,
            "tls": tls_status(st.live.tls),
            "state_dir": str(st.config.state_dir),
            "default_models": list(st.default_models),
            "models": [s.status() | st.described(s) for s in st.pool.served()],
            "failed_models": dict(st.pool.failures),
            "sync": st.syncer.status() if st.syncer is not None else [],
            "pulls": [p.as_dict() for p in request.app[PULLS].running.values()],  # with their bytes and stage
            "routing": {"route": st.config.route, "upstreams": st.router.describe()},
        }
    )


@routes.get("/api/hardware")
async def hardware(request: web.Request) -> web.Response:
    """The probe's facts and where each model was placed."""
    st = state(request)
    placements = [
        {
            "model": s.name,
            "version": s.manifest.version,
            "instance": n,
            "device": i.device,
            "providers": list(i.loaded.placement.providers),
            "threads": i.loaded.placement.threads,
            "note": i.loaded.placement.note,
            "batch_profile": i.profile.as_dict() if i.profile else None,
        }
        for s in st.pool.served()
        for n, i in enumerate(s.instances)
    ]
    memory = st.pool.ledger.as_dict()
    return web.json_response(st.hardware.as_dict() | {"placements": placements, "memory": memory})


@routes.get("/api/tasks")
async def tasks(request: web.Request) -> web.Response:
    """The installed tasks (``llmosd.tasks`` entry points): who registered each, its routes and precisions,
    and the plugins left out, with why."""
    return web.json_response(state(request).tasks.report())


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec(state(request).tasks.paths()))
