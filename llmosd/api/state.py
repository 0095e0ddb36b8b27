"""What the API handlers share, stored on the aiohttp application under one typed key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmosd.config import Config
from llmosd.hardware import Hardware
from llmosd.logs import MODEL
from llmosd.loopwatch import LoopLag
from llmosd.readiness import Readiness
from llmosd.registry.throttle import Throttle
from llmosd.routing.router import Router
from llmosd.scheduler import ModelPool, ServedModel
from llmosd.store import ModelStore
from llmosd.tasks import Tasks
from llmosd.tokens import Tokens

if TYPE_CHECKING:
    from llmosd.discovery.advertise import Advertiser
    from llmosd.tls.server import ServerTls
    from llmosd.versions import ModelVersions, Syncer


@dataclass
class Live:
    """What changes while the daemon runs, each field written by the one stage that owns it: the config
    and token (reload), the listeners, the advertiser and the sync once they run."""

    config: Config
    token: str
    tokens: Tokens = field(default_factory=Tokens)  # the token file's (admin) and the named, scoped ones
    listeners: tuple[str, ...] = ()
    advertiser: Advertiser | None = None  # once registered on the LAN over mDNS
    tls: ServerTls | None = None  # when the TCP listener speaks TLS: its context and certificate
    syncer: Syncer | None = None  # the registry sync, when the config subscribes to anything


@dataclass(frozen=True)
class AppState:
    """What the handlers see: the daemon's services and a read-only view of what changes."""

    live: Live
    store: ModelStore
    pool: ModelPool
    versions: ModelVersions
    hardware: Hardware  # the probe's facts, fixed for the daemon's life
    readiness: Readiness = field(default_factory=Readiness)
    throttle: Throttle = field(default_factory=lambda: Throttle(0))  # shared by the daemon's pulls
    install_id: str = ""  # stable per install (STATE/id), also in the mDNS TXT records
    default_models: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    lag: LoopLag = field(default_factory=LoopLag)  # how late the event loop woke (the loop watch)
    tasks: Tasks = field(default_factory=Tasks)  # the installed tasks (llmosd.tasks entry points)
    router: Router = field(default_factory=Router)  # LAN peers and upstreams (routes nothing by default)

    @property
    def config(self) -> Config:
        return self.live.config

    @property
    def token(self) -> str:
        return self.live.token

    @property
    def listeners(self) -> list[str]:
        return list(self.live.listeners)

    @property
    def advertiser(self) -> Advertiser | None:
        return self.live.advertiser

    @property
    def syncer(self) -> Syncer | None:
        return self.live.syncer

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    @property
    def status_line(self) -> str:
        return self.readiness.line

    def described(self, served: ServedModel) -> dict[str, Any]:
        """What the model's task adds to its card and status (a causal LM: its context, its template)."""
        task = self.tasks.get(served.manifest.task)
        return task.describe(served.loaded.backend) if task is not None and task.describe is not None else {}


STATE = web.AppKey("state", AppState)


def state(request: web.Request) -> AppState:
    return request.app[STATE]


TASK_KEY = "llmosd.task"  # request key: the task of the model that served the request
HELD = "llmosd.held"  # request key: the models this request holds, released by the middleware


async def hold(request: web.Request, name: str, keep_alive_s: float | None = None) -> ServedModel:
    """The served model, loaded on first use if the store has it, held until the response is done."""
    MODEL.set(name)  # the log records of this request carry MODEL=
    served = await state(request).pool.acquire(name, keep_alive_s)
    request.setdefault(HELD, []).append(served)
    request[TASK_KEY] = served.manifest.task  # the per-task request counters (metrics.track)
    return served
