"""What the API handlers share, stored on the aiohttp application under one typed key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from llmosd.config import Config
from llmosd.hardware import Hardware
from llmosd.scheduler import ModelPool
from llmosd.store import ModelStore


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


STATE = web.AppKey("state", AppState)


def state(request: web.Request) -> AppState:
    return request.app[STATE]
