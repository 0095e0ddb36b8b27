"""The upstreams a request may be routed to, and what is known of each: the models it lists, whether
it answers (health, with backoff when it does not), how fast it answers and how busy we keep it.

Two kinds: ``lan`` (another llmosd found over mDNS; its token from ``lan_token_file``) and ``openai``
(any OpenAI-compatible base URL; its API key from ``openai_upstream_key_file``). A secret lives only in
``Upstream.secret``, which no repr, log line or status shows."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from llmosd.routing.policy import Candidate

BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # the wait before the n-th retry of a dead upstream
FIRST_ANSWER_S = 0.5  # an upstream's answer time before any request measured it
EWMA = 0.2  # the weight of each new answer time


@dataclass
class Health:
    """Up until a failure; then down, skipped by requests, and probed again after a growing wait."""

    up: bool = False  # nothing is routed to an upstream before its first good check
    failures: int = 0
    retry_at: float = 0.0  # monotonic: when a down upstream is probed again
    last_error: str = ""
    checked: float = 0.0  # monotonic: the last check (good or bad)

    def ok(self) -> None:
        self.up, self.failures, self.last_error, self.checked = True, 0, "", time.monotonic()

    def failed(self, why: str) -> None:
        self.up, self.last_error, self.checked = False, why, time.monotonic()
        self.retry_at = self.checked + BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
        self.failures += 1

    def due(self, every_s: float) -> bool:
        now = time.monotonic()
        return now >= self.retry_at if not self.up else now - self.checked >= every_s


@dataclass
class Upstream:
    kind: str  # "lan" | "openai"
    name: str
    base_url: str  # lan: https://ADDR:PORT; openai: the base URL with its /v1
    secret: str = field(default="", repr=False)  # the bearer token or API key: never shown
    fingerprint: str = ""  # lan: the TLS certificate's SHA-256 from the peer's TXT record, pinned
    models: dict[str, bool] = field(default_factory=dict)  # name -> loaded there
    health: Health = field(default_factory=Health)
    answer_s: float = FIRST_ANSWER_S
    in_flight: int = 0
    sent: int = 0

    @property
    def route(self) -> str:
        return f"lan:{self.name}" if self.kind == "lan" else f"upstream:{self.name}"

    @functools.cached_property
    def ssl(self) -> aiohttp.Fingerprint | bool:
        # one object per upstream: aiohttp keys its connection pool on it (by identity), and a new
        # Fingerprint per request would open a new connection per request
        return aiohttp.Fingerprint(bytes.fromhex(self.fingerprint)) if self.fingerprint else True

    def url(self, path: str) -> str:
        """The upstream URL of one of our /v1 paths (an OpenAI base URL already ends in /v1)."""
        if self.kind == "openai":
            return self.base_url.rstrip("/") + path.removeprefix("/v1")
        return self.base_url.rstrip("/") + path

    def same_place(self, other: Upstream) -> bool:
        """The same server reached the same way: what is known of it still holds."""
        return (self.base_url, self.fingerprint, self.secret) == (other.base_url, other.fingerprint, other.secret)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"} if self.secret else {}

    def answered(self, seconds: float) -> None:
        self.answer_s += EWMA * (seconds - self.answer_s)

    def candidate(self, model: str) -> Candidate | None:
        if not self.health.up or model not in self.models:
            return None
        return Candidate(self.route, self.models[model], self.answer_s)

    def describe(self) -> dict[str, object]:
        """For /api/status: no secret, only whether one is set."""
        h = self.health
        return {
            "route": self.route,
            "url": self.base_url,
            "up": h.up,
            "failures": h.failures,
            "last_error": h.last_error,
            "models": sorted(self.models),
            "answer_s": round(self.answer_s, 3),
            "in_flight": self.in_flight,
            "sent": self.sent,
            "credentials": bool(self.secret),
        }


def openai_base(url: str) -> str:
    """The base URL as the OpenAI SDKs take it: a bare host gets /v1."""
    parts = urlsplit(url)
    return url.rstrip("/") + "/v1" if parts.path in ("", "/") else url.rstrip("/")


def openai_name(url: str, configured: str = "") -> str:
    parts = urlsplit(url)
    return configured or parts.netloc.rpartition("@")[2] or "openai"


def read_secret(path: Path | None) -> str:
    """The first non-empty line of a key file ("" when none is configured)."""
    if path is None:
        return ""
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError(f"{path} holds no key")


@dataclass(frozen=True)
class LanTokens:
    """``lan_token_file``: one line with a token (the site's, sent to every peer), or ``NAME TOKEN`` lines
    (NAME: a peer's mDNS name or install id); a bare line is the token for peers not named."""

    site: str = field(default="", repr=False)
    by_peer: Mapping[str, str] = field(default_factory=dict, repr=False)

    def for_peer(self, name: str, install_id: str) -> str:
        return self.by_peer.get(name) or self.by_peer.get(install_id) or self.site

    @classmethod
    def read(cls, path: Path | None, own: str) -> LanTokens:
        if path is None:
            return cls(own)  # a site that shares one token (as the peer cache assumes)
        site, by_peer = "", {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, token = line.rpartition(" ") if " " in line else ("", "", line)
            if not name:
                site = token
            elif token:
                by_peer[name.strip()] = token
            else:
                raise ValueError(f"{path}:{n}: expected TOKEN or NAME TOKEN")
        if not site and not by_peer:
            raise ValueError(f"{path} holds no token")
        return cls(site, by_peer)
