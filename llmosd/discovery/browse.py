"""Finding appliances on the LAN: a browser that keeps the current set (and tells what changed), and
``discover`` / ``async_discover`` that browse for a while and return what answered."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from types import TracebackType

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from llmosd.discovery.txt import SERVICE_TYPE, Appliance, appliance

log = logging.getLogger(__name__)

RESOLVE_MS = 3000
SETTLE_S = 1.2  # an update is read this long after it is heard
Listener = Callable[[str, Appliance], None]  # ("added" | "updated" | "removed", appliance)


def _from_info(info: AsyncServiceInfo) -> Appliance:
    txt = {k: v or "" for k, v in info.decoded_properties.items()}
    return appliance(info.name, info.parsed_addresses(IPVersion.V4Only), info.port or 0, info.server or "", txt)


class Browser:
    """``async with Browser(listener) as b``: ``b.found`` holds the appliances seen and still there."""

    def __init__(
        self, listener: Listener | None = None, interfaces: Sequence[str] = (), zc: AsyncZeroconf | None = None
    ) -> None:
        self.listener = listener
        self.interfaces = list(interfaces)  # addresses to browse on (default: every interface)
        self.found: dict[str, Appliance] = {}
        self._own_zc = zc is None  # a Zeroconf lent by its owner (the advertiser) is not closed here
        self._zc: AsyncZeroconf | None = zc
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, asyncio.Task[None]] = {}  # a resolution waiting to run, by name

    async def __aenter__(self) -> Browser:
        if self._zc is None:
            chosen = self.interfaces or InterfaceChoice.All
            self._zc = AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None and self._own_zc:
            await self._zc.async_close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            if (pending := self._pending.pop(name, None)) is not None:
                pending.cancel()
            gone = self.found.pop(name, None)
            if gone is not None and self.listener is not None:
                self.listener("removed", gone)
            return
        # An update resolves a little later, once: records it replaced stay in the cache for one more
        # second (RFC 6762 §10.2), and reading at once would still show, say, an address just dropped.
        delay = SETTLE_S if state_change is ServiceStateChange.Updated else 0.0
        if (pending := self._pending.pop(name, None)) is not None:
            pending.cancel()
        task = asyncio.get_running_loop().create_task(self._resolve(name, delay))
        self._pending[name] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str, delay: float) -> None:
        assert self._zc is not None
        await asyncio.sleep(delay)
        self._pending.pop(name, None)
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        found = _from_info(info)
        before = self.found.get(name)
        self.found[name] = found
        if self.listener is not None and found != before:
            self.listener("added" if before is None else "updated", found)


async def async_discover(timeout: float = 3.0, interfaces: Sequence[str] = ()) -> list[Appliance]:
    """The appliances that answered within ``timeout`` seconds, by name (on these interface addresses
    only, when given)."""
    async with Browser(interfaces=interfaces) as browser:
        await asyncio.sleep(timeout)
        return sorted(browser.found.values(), key=lambda a: (a.name, a.id))


def discover(timeout: float = 3.0) -> list[Appliance]:
    """``async_discover`` for synchronous code (in a thread of its own if this one runs an event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(async_discover(timeout))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, async_discover(timeout)).result()
