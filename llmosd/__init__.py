"""llmosd: an edge / on-prem appliance daemon for language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmosd.client import AsyncClient, Client, async_discover, discover

_CLIENT = ("AsyncClient", "Client", "async_discover", "discover")


def __getattr__(name: str) -> Any:
    # `from llmosd import Client` without importing the client for every `import llmosd`.
    if name in _CLIENT:
        from llmosd import client

        return getattr(client, name)
    raise AttributeError(f"module 'llmosd' has no attribute {name!r}")


__all__ = ["AsyncClient", "Client", "__version__", "async_discover", "discover"]
