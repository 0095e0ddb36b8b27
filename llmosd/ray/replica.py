"""One Ray Serve replica: a whole llmosd daemon in-process (the same stages as ``llmosd serve``: probe,
store, pool, scheduler, the API), listening only on a private Unix socket, with ``forward`` passing each
request from the ingress (``llmosd.ray.ingress``) to it unchanged and its answer back, streams as they
come.

Reusing the daemon rather than re-wiring its handlers keeps one implementation of every route (the
validation, chat templates, grammars, error shapes): the price is one local HTTP hop per request, which
``bench/ray_serve.py`` measures with Serve's own against the daemon's."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, cast

import aiohttp
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmosd.config import load_config
from llmosd.daemon import Daemon, build
from llmosd.hardware import probe
from llmosd.systemd import Notifier
from llmosd.tasks import discover

PASSED = ("content-type", "accept", "x-request-id")  # the request headers that reach the daemon
KEPT = ("content-type", "cache-control", "retry-after", "x-llmosd-route")  # Serve sets its own x-request-id


class Replica:
    """The deployment's class: ``Replica.bind(models, state_dir, settings)``."""

    # Serve awaits an async constructor before the replica takes traffic (the load happens in it)
    async def __init__(  # type: ignore[misc]
        self, models: list[str], state_dir: str, settings: dict[str, Any] | None = None
    ) -> None:
        self.models = list(models)
        self._dir = tempfile.TemporaryDirectory(prefix="llmosd-replica-")
        sock = Path(self._dir.name) / "llmosd.sock"
        flags = {"state_dir": state_dir, "socket": str(sock), "host": "none", "mdns": False, "seed_defaults": False}
        config = load_config(flags | dict(settings or {}), environ={})
        hw, tasks = await asyncio.gather(asyncio.to_thread(probe), asyncio.to_thread(discover))
        self.daemon: Daemon = build(config, hw, tasks, Notifier({}))
        await self.daemon.chain.start()
        pool = self.daemon.state.pool
        for name in self.models:  # loaded and warm before the replica takes traffic
            pool.release(await pool.acquire(name))
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        self.who = f"{os.getpid()}@{os.uname().nodename}"

    async def check_health(self) -> None:
        """Serve's health check: every model's workers run (a dead one is replaced by the supervisor,
        and a model it gave up on fails the replica, which Serve then restarts)."""
        pool = self.daemon.state.pool
        for name in self.models:
            if not pool.get(name).healthy():
                raise RuntimeError(f"model {name} is not healthy")

    async def __call__(self, request: Request) -> Response:
        """A request from Serve's HTTP proxy straight to this replica, with no ingress in front
        (``--ingress-replicas 0``): one hop less, and nobody to resend what a dying replica held."""
        parts = self.forward(request.method, request.url.path, request.url.query, request.headers, await request.body())
        head = await anext(parts)
        if head["stream"]:
            return StreamingResponse(parts, status_code=head["status"], headers=head["headers"])
        body = await anext(parts)
        await parts.aclose()
        return Response(body, status_code=head["status"], headers=head["headers"])

    async def call(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        """One request to the daemon, answered whole: ``({"status", "headers", "stream"}, body)``, one
        object back to the ingress rather than a stream of them (every answer not asked for as a stream)."""
        async with self._request(method, path, query, headers, body) as answer:
            return self._head(answer), await answer.read()

    async def forward(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncGenerator[Any, None]:
        """One request to the daemon, streamed to the ingress: first ``{"status", "headers", "stream"}``,
        then the body, whole (one item) or as a stream's chunks come."""
        async with self._request(method, path, query, headers, body) as answer:
            head = self._head(answer)
            yield head
            if not head["stream"]:
                yield await answer.read()
                return
            async for chunk in answer.content.iter_any():
                yield chunk

    def _request(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> aiohttp.client._RequestContextManager:
        url = f"http://llmosd{path}" + (f"?{query}" if query else "")
        passed = {k: v for k in PASSED if (v := headers.get(k))}  # not Host, Content-Length, Authorization...
        return self.session.request(method, url, data=body or None, headers=passed)

    def _head(self, answer: aiohttp.ClientResponse) -> dict[str, Any]:
        kept = {k: v for k, v in answer.headers.items() if k.lower() in KEPT} | {"X-Llmosd-Replica": self.who}
        stream = answer.headers.get("Content-Type", "").startswith("text/event-stream")
        return {"status": answer.status, "headers": kept, "stream": stream}

    async def __del__(self) -> None:  # Serve calls it when the replica stops
        await self.session.close()
        await self.daemon.chain.stop()
        self._dir.cleanup()


class Autoscale(NamedTuple):
    """Serve's autoscaler on ongoing requests: between ``low`` and ``high`` replicas, ``target`` ongoing
    requests each. Serve waits 30 s before adding a replica by default; a replica here is up in seconds
    (a daemon that loads from the store), so 10 s is the default."""

    low: int
    high: int
    target: float = 8
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 600.0  # Serve's own default: a replica is not given back on a lull

    def config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.low,
            "max_replicas": self.high,
            "target_ongoing_requests": self.target,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


def deployment(replicas: int | None, autoscale: Autoscale | None, num_cpus: float, num_gpus: float) -> serve.Deployment:
    """The deployment with its placement and scaling: ``replicas`` fixed, or ``autoscale``."""
    options: dict[str, Any] = {
        "name": "llmosd",
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": 64,  # the daemon batches what it holds: let it hold enough to batch
        "health_check_period_s": 5,
    }
    if autoscale is not None:
        options["autoscaling_config"] = autoscale.config()
    else:
        options["num_replicas"] = replicas or 1
    return cast(serve.Deployment, serve.deployment(Replica)).options(**options)
