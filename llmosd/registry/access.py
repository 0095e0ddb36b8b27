"""How this install reaches registries, built once from the config: which hosts speak plain HTTP, the
site's CA, the bandwidth every pull shares, and whose signatures a pull from each host needs. The CLI,
the API and the sync all open registries through it, so they cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llmosd.config import Config, items
from llmosd.registry.client import Registry, docker_credentials
from llmosd.registry.signing import Trust, trust_policy
from llmosd.registry.throttle import UNLIMITED, Throttle


@dataclass(frozen=True)
class Registries:
    insecure: frozenset[str] = frozenset()  # hosts named in insecure_registries
    ca_file: str = ""  # registries' CAs besides the system's
    trust_dir: Path = Path("trust")
    allow_unsigned_from: str = ""
    throttle: Throttle = UNLIMITED

    @classmethod
    def from_config(cls, config: Config, throttle: Throttle = UNLIMITED) -> Registries:
        return cls(
            insecure=frozenset(items(config.insecure_registries)),
            ca_file=config.registry_ca_file,
            trust_dir=config.trust_dir,
            allow_unsigned_from=config.allow_unsigned_from,
            throttle=throttle,
        )

    def open(self, host: str, session: aiohttp.ClientSession, insecure: bool = False) -> Registry:
        """``host`` with the Docker config's credentials; plain HTTP when asked (``--insecure``), when the
        config names the host, or on loopback."""
        return Registry(
            host,
            session,
            credentials=docker_credentials(host),
            insecure=insecure or host in self.insecure,
            ca_file=self.ca_file or None,
            throttle=self.throttle,
        )

    def trust(self, host: str) -> Trust | None:
        """The keys a pull from ``host`` must be signed by; None where unsigned models are allowed."""
        return trust_policy(self.trust_dir, self.allow_unsigned_from, host)
