"""GET /api/stats: one sample of what the console charts, as cumulative counters and gauges.

The browser turns two successive samples into rates and quantiles (what Prometheus' ``rate()`` and
``histogram_quantile()`` do), so the daemon keeps nothing per viewer and pays nothing between polls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
from aiohttp import web

from llmosd.api.metrics import METRICS, Metrics
from llmosd.api.state import AppState, state
from llmosd.hardware.gpu import gpu_usage
from llmosd.scheduler import DynamicBatcher, GenerationEngine
from llmosd.scheduler.histogram import Snapshot
from llmosd.scheduler.served import ServedModel

routes = web.RouteTableDef()


def _histogram(snap: Snapshot) -> dict[str, Any]:
    return {"bounds": list(snap.bounds), "cumulative": list(snap.cumulative), "sum": snap.total}


def model_sample(served: ServedModel, metrics: Metrics) -> dict[str, Any]:
    m = served.manifest
    encoders = [i.worker for i in served.instances if isinstance(i.worker, DynamicBatcher)]
    batchers = [b.stats for b in encoders]
    engines = [i.worker.stats for i in served.instances if isinstance(i.worker, GenerationEngine)]
    return {
        "name": m.name,
        "version": m.version,
        "task": m.task,
        "precision": m.precision,
        "devices": list(dict.fromkeys(served.devices)),
        "latency": _histogram(metrics.model_latency.snapshot(m.name)),  # its count: the requests
        "queue_depth": sum(i.queued() for i in served.instances),
        "running": sum(g.running for g in engines),
        "generated_tokens": sum(g.generated_tokens for g in engines),
        "batches": sum(b.batches for b in batchers),  # encoders: inputs per batch run
        "batch_items": sum(b.items for b in batchers),
        "max_batch": max((b.policy.max_batch for b in encoders), default=None),  # what the probe chose
    }


def device_sample(st: AppState, usage: list[tuple[str, int, int, int]]) -> list[dict[str, Any]]:
    """Each device's memory: in use on the whole device, and what this daemon's models reserved there."""
    ledger = st.pool.ledger
    reserved = {device: sum(ledger.used.get(device, {}).values()) for device in ledger.capacity}
    vm = psutil.virtual_memory()
    out = [{"device": "cpu", "total": vm.total, "used": vm.total - vm.available, "models": reserved.get("cpu", 0)}]
    for device, total, used, _ in usage:
        out.append({"device": device, "total": total, "used": used, "models": reserved.get(device, 0)})
    return out


@routes.get("/api/stats")
async def stats(request: web.Request) -> web.Response:
    st = state(request)
    usage = await asyncio.to_thread(gpu_usage) if st.hardware.gpus else []  # NVML queries block
    metrics = request.app[METRICS]
    return web.json_response(
        {
            "t": time.monotonic(),  # the browser's rates divide by this clock, never by its own
            "models": [model_sample(s, metrics) for s in st.pool.served()],
            "devices": device_sample(st, usage),
            "rss_bytes": psutil.Process().memory_info().rss,
            "peers": [
                {"name": a.name, "url": a.url, "models": list(a.models), "devices": list(a.devices), "tls": a.tls}
                for a in (st.advertiser.neighbours() if st.advertiser is not None else [])
            ],
        }
    )
