"""Rate limits for non-local clients: token buckets per bearer token and per client address, for
requests and for generated tokens (config ``rate_limit_rps``, ``rate_limit_tokens_per_s``,
``rate_limit_burst_s``; 0: no limit). A request over either is a 429 with ``Retry-After``; generated
tokens are charged when the answer is done (a bucket may go into debt: the next request waits it out).
Local clients (the Unix socket, loopback) are not limited: they are the box's own."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from llmosd.api.errors import ApiError
from llmosd.api.metrics import METRICS
from llmosd.api.state import state

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GRANT_KEY = "llmosd.grant"  # request key: the token's name (auth puts it there)
STREAMS_KEY = "llmosd.streams"  # request key: the generation streams an answer started
KEYS = 4096  # buckets kept (least recently used dropped): a flood of addresses cannot grow memory


@dataclass
class _Bucket:
    level: float
    stamp: float


class Buckets:
    def __init__(self, keys: int = KEYS) -> None:
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._keys = keys

    def _refilled(self, key: str, rate: float, capacity: float, now: float) -> _Bucket:
        b = self._buckets.pop(key, None) or _Bucket(capacity, now)
        b.level, b.stamp = min(capacity, b.level + (now - b.stamp) * rate), now
        self._buckets[key] = b
        while len(self._buckets) > self._keys:
            self._buckets.popitem(last=False)
        return b

    def take(self, key: str, rate: float, capacity: float, cost: float, now: float) -> float:
        """Take ``cost`` if the bucket holds it: 0, else the seconds until it will (nothing taken)."""
        b = self._refilled(key, rate, capacity, now)
        if b.level >= cost:
            b.level -= cost
            return 0.0
        return (cost - b.level) / rate

    def charge(self, key: str, rate: float, capacity: float, cost: float, now: float) -> None:
        self._refilled(key, rate, capacity, now).level -= cost


LIMITS = web.AppKey("rate_limits", Buckets)


def _keys(request: web.Request) -> list[str]:
    grant = request.get(GRANT_KEY)
    return [f"addr:{request.remote}", *([f"token:{grant}"] if isinstance(grant, str) else [])]


def charge_refusal(request: web.Request) -> None:
    """A request refused for its token (401) costs its address one request of the limit, as any other
    would: a client guessing tokens is held to the same rate, and past it gets a 429 (and no log line)."""
    config, buckets = state(request).config, request.app[LIMITS]
    rps, burst = config.rate_limit_rps, config.rate_limit_burst_s
    if not rps:
        return
    if wait := buckets.take(f"addr:{request.remote}", rps, max(1.0, rps * burst), 1.0, time.monotonic()):
        raise _limited(request, f"this client may make {rps:g} requests a second, refused ones included", wait)


def _limited(request: web.Request, limits: str, wait: float) -> ApiError:
    """The 429 (counted in /metrics) for a client past ``limits``, retrying in ``wait`` seconds."""
    request.app[METRICS].rate_limited.inc()
    retry = math.ceil(wait)
    return ApiError(
        429, f"rate limited: {limits}; retry in {retry} s", type="rate_limit_error", headers={"Retry-After": str(retry)}
    )


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """After auth: only requests that presented a token reach here limited (see GRANT_KEY)."""
    if GRANT_KEY not in request:  # local, or a public probe
        return await handler(request)
    config, buckets = state(request).config, request.app[LIMITS]
    rps, tps, burst = config.rate_limit_rps, config.rate_limit_tokens_per_s, config.rate_limit_burst_s
    now = time.monotonic()
    keys = _keys(request)
    waits = [buckets.take(k, rps, max(1.0, rps * burst), 1.0, now) for k in keys] if rps else []
    waits += [buckets.take("gen:" + k, tps, max(1.0, tps * burst), 0.0, now) for k in keys] if tps else []
    if wait := max(waits, default=0.0):
        limits = f"this client may make {rps:g} requests and generate {tps:g} tokens a second (0: no limit)"
        raise _limited(request, limits, wait)
    try:
        return await handler(request)
    finally:
        generated = sum(s.completion_tokens for s in request.get(STREAMS_KEY, ()))
        if tps and generated:
            for k in keys:
                buckets.charge("gen:" + k, tps, max(1.0, tps * burst), generated, time.monotonic())
