"""The Python client: ``Client().load_model("smollm2-135m-instruct").generate_text("...")``.

``Client`` (standard library HTTP) and ``AsyncClient`` (aiohttp) connect to the local Unix socket when
there is one (no token needed), else to ``LLMOSD_URL``, else to an appliance found on the LAN over mDNS
(``name=`` / ``id=`` choose one); the token comes from ``token=`` or ``LLMOSD_TOKEN``. ``discover()`` and
``async_discover()`` list the appliances on the LAN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmosd.client.errors import ApiError, ConnectionFailed, LlmosdError
from llmosd.client.sync import Client, Model
from llmosd.discovery.txt import Appliance

if TYPE_CHECKING:
    from llmosd.client.aio import AsyncClient, AsyncModel

__all__ = [
    "ApiError",
    "Appliance",
    "AsyncClient",
    "AsyncModel",
    "Client",
    "ConnectionFailed",
    "LlmosdError",
    "Model",
    "async_discover",
    "discover",
]


def discover(timeout: float = 3.0) -> list[Appliance]:
    """The llmosd appliances answering on the LAN within ``timeout`` seconds."""
    from llmosd.discovery.browse import discover as browse

    return browse(timeout)


async def async_discover(timeout: float = 3.0) -> list[Appliance]:
    from llmosd.discovery.browse import async_discover as browse

    return await browse(timeout)


def __getattr__(name: str) -> Any:  # aiohttp only for those who use the async client
    if name in ("AsyncClient", "AsyncModel"):
        from llmosd.client import aio

        return getattr(aio, name)
    raise AttributeError(name)
