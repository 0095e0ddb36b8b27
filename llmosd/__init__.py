"""llmosd: an edge / on-prem appliance daemon for language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmosd.client import Client


def __getattr__(name: str) -> Any:
    # `from llmosd import Client` without importing the client for every `import llmosd`.
    if name == "Client":
        from llmosd.client import Client

        return Client
    raise AttributeError(f"module 'llmosd' has no attribute {name!r}")


__all__ = ["Client", "__version__"]
