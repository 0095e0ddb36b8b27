"""Models as OCI artifacts in any registry: the mapping (oci.py), the distribution API (client.py), push
and pull into the store (transfer.py)."""

from llmosd.registry.client import Credentials, DigestMismatch, Registry, RegistryError, docker_credentials
from llmosd.registry.oci import Reference, parse_reference
from llmosd.registry.transfer import NotEnoughSpace, PullResult, PushResult, pull, push

__all__ = [
    "Credentials",
    "DigestMismatch",
    "NotEnoughSpace",
    "PullResult",
    "PushResult",
    "Reference",
    "Registry",
    "RegistryError",
    "docker_credentials",
    "parse_reference",
    "pull",
    "push",
]
