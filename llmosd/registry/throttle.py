"""A download bandwidth cap shared by every pull of a daemon (a token bucket): a background sync must
not starve the site's WAN link."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Throttle:
    """``await throttle.take(n)`` after moving n bytes: sleeps as long as keeps the average within
    ``bytes_per_s``, allowing bursts of one second's worth. 0 means no cap."""

    def __init__(
        self,
        bytes_per_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = bytes_per_s
        self.clock = clock
        self.sleep = sleep
        self.tokens = bytes_per_s
        self.stamp = clock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.tokens < 0:
            await self.sleep(-self.tokens / self.rate)


UNLIMITED = Throttle(0)
