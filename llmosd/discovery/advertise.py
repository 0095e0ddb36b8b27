"""Advertising the daemon on the LAN: one task owns the AsyncZeroconf for its whole life. It registers
``_llmosd._tcp`` (renaming to ``name (2)`` on a conflict), republishes the TXT records when the daemon
says its models changed, follows interface changes by polling, and sends a goodbye when cancelled.
On the same Zeroconf it keeps browsing, so the appliances beside it (the peer cache's sources) are
known before a pull needs them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from llmosd.atomic import replace_file
from llmosd.discovery.browse import Browser
from llmosd.discovery.txt import SERVICE_TYPE, Appliance

log = logging.getLogger(__name__)

POLL_S = 5.0  # how often interfaces are looked at again
PROBE_MS = 1500  # how long an answer for our name is waited for before taking it
TTL_S = 120  # record lifetime: a daemon killed without a goodbye leaves caches within it
MIN_UPDATE_S = 1.5  # between two TXT updates


def install_id(state_dir: Path) -> str:
    """A random id made once per install (STATE/id): tells two appliances with the same name apart."""
    path = state_dir / "id"
    with contextlib.suppress(FileNotFoundError):
        value = path.read_text().strip()
        if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
            return value
    value = uuid.uuid4().hex
    replace_file(path, value + "\n")
    return value


def _bound(bind_host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(bind_host)
    except ValueError:  # a host name: resolve it the way the listener did
        return ipaddress.ip_address(socket.gethostbyname(bind_host))


def is_loopback(bind_host: str) -> bool:
    return _bound(bind_host).is_loopback


def lan_addresses(bind_host: str, interfaces: Sequence[str] = ()) -> list[str]:
    """The IPv4 addresses a LAN client can reach the TCP listener on: the bound address itself, or for a
    wildcard bind every non-loopback address of the chosen interfaces (all that are up when none are
    chosen). Empty for a loopback bind: advertising it would send clients nowhere."""
    bound = _bound(bind_host)
    if bound.is_loopback:
        return []
    up = {name for name, st in psutil.net_if_stats().items() if st.isup}
    out = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name not in up or (interfaces and name not in interfaces):
            continue
        for a in addrs:
            if a.family != socket.AF_INET or ipaddress.ip_address(a.address).is_loopback:
                continue
            if bound.is_unspecified or str(bound) == a.address:
                out.append(a.address)
    return out


def _content(txt: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in txt.items() if k != "rev"}


class Advertiser:
    def __init__(
        self,
        name: str,
        host_id: str,
        port: int,
        bind_host: str,
        txt: Callable[[], dict[str, str]],
        interfaces: Sequence[str] = (),
        poll_s: float = POLL_S,
    ) -> None:
        self.base_name = name
        self.name = name  # after a rename on conflict: "name (2)"
        self.server = f"llmosd-{host_id[:12]}.local."  # unique per install, unlike the host name
        self.port = port
        self.bind_host = bind_host
        self.interfaces = tuple(interfaces)
        self.txt = txt
        self.poll_s = poll_s
        self.host_id = host_id
        self.registered = asyncio.Event()
        self._changed = asyncio.Event()
        self._browser: Browser | None = None

    def neighbours(self) -> list[Appliance]:
        """The other appliances heard on the advertised interfaces (not this install), by name."""
        found = self._browser.found.values() if self._browser is not None else ()
        return sorted((a for a in found if a.id != self.host_id), key=lambda a: (a.name, a.id))

    def changed(self) -> None:
        """The daemon's models changed: republish the TXT records (on the loop)."""
        self._changed.set()

    def _info(self, addresses: list[str], txt: dict[str, str]) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            port=self.port,
            properties=txt,
            server=self.server,
            parsed_addresses=addresses,
            host_ttl=TTL_S,
            other_ttl=TTL_S,
        )

    async def _wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), self.poll_s)
        self._changed.clear()

    async def run(self) -> None:
        """Advertise until cancelled; the goodbye goes out on the way out."""
        addresses = lan_addresses(self.bind_host, self.interfaces)
        while not addresses:  # e.g. the network is not up yet at boot
            log.info("mDNS: no LAN address to advertise on %s yet; looking again in %g s", self.bind_host, self.poll_s)
            await self._wait()
            addresses = lan_addresses(self.bind_host, self.interfaces)
        zc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        browser = Browser(zc=zc)
        try:
            txt = self.txt() | {"rev": "1"}
            info = await self._register(zc, addresses, txt)
            self._browser = await browser.__aenter__()
            last = time.monotonic()
            while True:
                await self._wait()
                now = lan_addresses(self.bind_host, self.interfaces)
                if now and now != addresses:
                    log.info("mDNS: addresses changed from %s to %s", ",".join(addresses), ",".join(now))
                    await zc.zeroconf.async_update_interfaces(now)
                    addresses = now
                elif not now:
                    log.warning("mDNS: no LAN address left; still advertising %s", ",".join(addresses))
                # RFC 6762 §10.2: a browser keeps every version of a record heard within one second,
                # so updates closer than that leave it holding the old TXT beside the new one
                await asyncio.sleep(max(0.0, last + MIN_UPDATE_S - time.monotonic()))
                if (fresh := self.txt()) != _content(txt) or info.parsed_addresses() != addresses:
                    # a new revision each time: a TXT equal to an earlier one could match a record the
                    # browsers still hold (expired, not yet purged) and not count as a change there
                    txt = fresh | {"rev": str(int(txt["rev"]) + 1)}
                    info = self._info(addresses, txt)
                    log.info("mDNS: updating %r: models=%s dev=%s", self.name, txt.get("models"), txt.get("dev"))
                    # wait out this update's announcements: a later update must not be overtaken by
                    # this one's repeats, or browsers keep the older TXT
                    await (await zc.async_update_service(info))
                    last = time.monotonic()
        finally:
            self._browser = None
            await asyncio.shield(self._goodbye(zc, browser))

    async def _register(self, zc: AsyncZeroconf, addresses: list[str], txt: dict[str, str]) -> ServiceInfo:
        """Probe and announce; another appliance with the name already: "name (2)", "name (3)", …"""
        n = 1
        while True:
            info = self._info(addresses, txt)
            try:
                if await self._taken(zc, info.name, txt.get("id", "")):
                    raise NonUniqueNameException
                await (await zc.async_register_service(info, ttl=TTL_S))
            except NonUniqueNameException:
                n += 1
                self.name = f"{self.base_name} ({n})"
                log.warning("mDNS: the name %r is taken on the LAN; advertising as %r", self.base_name, self.name)
                continue
            log.info("mDNS: advertising %r (%s) on %s port %d", self.name, SERVICE_TYPE, ",".join(addresses), self.port)
            self.registered.set()
            return info

    @staticmethod
    async def _taken(zc: AsyncZeroconf, name: str, own_id: str) -> bool:
        """Whether another install answers for ``name``. zeroconf's own probe only sees a conflict whose
        PTR record it already holds (it asks for the name; the answers are SRV and TXT), so we resolve
        the name first. Our own id answering (records of a previous run still cached) is no conflict."""
        other = await zc.async_get_service_info(SERVICE_TYPE, name, timeout=PROBE_MS)
        return other is not None and other.decoded_properties.get("id") != own_id

    async def _goodbye(self, zc: AsyncZeroconf, browser: Browser) -> None:
        try:
            await browser.__aexit__(None, None, None)
            await zc.async_unregister_all_services()  # the goodbye: records with TTL 0
            log.info("mDNS: sent goodbye for %r", self.name)
        finally:
            await zc.async_close()
