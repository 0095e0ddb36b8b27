"""The LAN peer cache: appliances found by mDNS serve their verified blobs (``GET /api/blobs/<digest>``),
and a pull asks them for each file before the registry — one WAN download per site instead of one per
box. Every byte is checked against the digest the signed manifest names, so a peer cannot inject
content; one that fails or lies is skipped and the registry serves the file."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llmosd.registry.client import Progress, RegistryError, download
from llmosd.registry.throttle import UNLIMITED, Throttle

log = logging.getLogger(__name__)

CONNECT_S = 3.0


@dataclass(frozen=True)
class Peer:
    url: str  # another appliance's base URL
    token: str  # its bearer token (a site shares one)
    name: str = ""
    fingerprint: str = ""  # its TLS certificate's SHA-256 as it advertises it: pinned, no CA involved

    @functools.cached_property
    def ssl(self) -> aiohttp.Fingerprint | bool:
        # one object per peer: aiohttp keys its connection pool on it by identity (a new one per blob
        # would open a new connection per blob)
        return aiohttp.Fingerprint(bytes.fromhex(self.fingerprint)) if self.fingerprint else True

    def __str__(self) -> str:
        return self.name or self.url


async def fetch(
    session: aiohttp.ClientSession,
    peer: Peer,
    digest: str,
    size: int,
    dst: Path,
    progress: Progress | None = None,
    throttle: Throttle = UNLIMITED,
) -> None:
    """The blob from ``peer`` into ``dst``; RegistryError if it does not have it, DigestMismatch if its
    bytes are not those the digest names."""

    async def open_blob(headers: dict[str, str]) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=30)
        r = await session.get(
            f"{peer.url}/api/blobs/{digest}",
            headers={**headers, "Authorization": f"Bearer {peer.token}"},
            timeout=timeout,
            ssl=peer.ssl,
        )
        if r.status not in (200, 206):
            r.release()
            raise RegistryError(f"peer {peer} does not serve {digest} ({r.status})", r.status)
        return r

    await download(open_blob, digest, size, dst, progress, throttle)
