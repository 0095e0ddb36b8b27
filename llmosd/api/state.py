"""What the API handlers share, stored on the aiohttp application under one typed key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmosd.config import Config
from llmosd.hardware import Hardware
from llmosd.logs import MODEL
from llmosd.registry.throttle import Throttle
from llmosd.scheduler import ModelPool, ServedModel
from llmosd.store import ModelStore

if TYPE_CHECKING:
    from llmosd.discovery.advertise import Advertiser
    from llmosd.registry.sync import Syncer


@dataclass
class AppState:
    config: Config
    store: ModelStore
    pool: ModelPool
    token: str
    default_models: tuple[str, ...] = ()
    ready: bool = False
    status_line: str = "starting"
    started: float = field(default_factory=time.time)
    listeners: list[str] = field(default_factory=list)
    hardware: Hardware | None = None  # probed once at start, in a thread
    install_id: str = ""  # stable per install (STATE/id), also in the mDNS TXT records
    passed: dict[str, Any] = field(default_factory=dict)  # config values set by systemd's sockets
    advertiser: Advertiser | None = None  # once registered on the LAN over mDNS
    syncer: Syncer | None = None  # the registry sync, when the config subscribes to anything
    throttle: Throttle = field(default_factory=lambda: Throttle(0))  # shared by the daemon's pulls


STATE = web.AppKey("state", AppState)


def state(request: web.Request) -> AppState:
    return request.app[STATE]


HELD = "llmosd.held"  # request key: the models this request holds, released by the middleware


async def hold(request: web.Request, name: str, keep_alive_s: float | None = None) -> ServedModel:
    """The served model, loaded on first use if the store has it, held until the response is done."""
    MODEL.set(name)  # the log records of this request carry MODEL=
    served = await state(request).pool.acquire(name, keep_alive_s)
    request.setdefault(HELD, []).append(served)
    return served
