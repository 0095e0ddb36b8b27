"""One Ray Serve replica: a whole llmosd daemon in-process (the same stages as ``llmosd serve``: probe,
store, pool, scheduler, the API), listening only on a private Unix socket, with the replica's Starlette
ingress passing each request to it unchanged and its answer back, streams as they come.

Reusing the daemon rather than re-wiring its handlers keeps one implementation of every route (the
validation, chat templates, grammars, error shapes): the price is one local HTTP hop per request, which
``bench/routing.py`` measures against the daemon's own."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmosd.config import load_config
from llmosd.daemon import Daemon, build
from llmosd.hardware import probe
from llmosd.systemd import Notifier
from llmosd.tasks import discover

PASSED = ("Content-Type", "Accept", "X-Request-Id")  # the request headers that reach the daemon
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
        body = await request.body()
        headers = {k: v for k in PASSED if (v := request.headers.get(k))}
        url = f"http://llmosd{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
        answer = await self.session.request(request.method, url, data=body or None, headers=headers)
        kept = {k: v for k, v in answer.headers.items() if k.lower() in KEPT} | {"X-Llmosd-Replica": self.who}
        if answer.headers.get("Content-Type", "").startswith("text/event-stream"):

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in answer.content.iter_any():
                        yield chunk
                finally:
                    answer.release()

            return StreamingResponse(chunks(), status_code=answer.status, headers=kept)
        async with answer:
            return Response(await answer.read(), status_code=answer.status, headers=kept)

    async def __del__(self) -> None:  # Serve calls it when the replica stops
        await self.session.close()
        await self.daemon.chain.stop()
        self._dir.cleanup()


def deployment(
    replicas: int | None, autoscale: tuple[int, int] | None, num_cpus: float, num_gpus: float
) -> serve.Deployment:
    """The deployment with its placement and scaling: ``replicas`` fixed, or ``autoscale`` (min, max) on
    ongoing requests (Serve's own autoscaler)."""
    options: dict[str, Any] = {
        "name": "llmosd",
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": 64,  # the daemon batches what it holds: let it hold enough to batch
        "health_check_period_s": 5,
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 8}
    else:
        options["num_replicas"] = replicas or 1
    return cast(serve.Deployment, serve.deployment(Replica)).options(**options)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run llmosd.ray.replica:app_builder models=all-minilm-l6-v2 state_dir=/srv/llmosd``."""
    models = [m for m in str(args["models"]).split(",") if m]
    replicas = int(args.get("replicas", 1))
    threads = {"threads": int(args["threads"])} if "threads" in args else {}
    dep = deployment(replicas, None, float(args.get("num_cpus", 1)), float(args.get("num_gpus", 0)))
    return dep.bind(models, str(args["state_dir"]), threads)
