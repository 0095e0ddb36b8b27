"""Background sync of subscribed tags (``REGISTRY/REPO:TAG[=NAME]``): each is polled on an interval with
jitter, backing off exponentially while the registry is unreachable. A new digest is pulled (signature
policy applied), smoke-tested (loaded in a session of its own and run on a sample input), activated
(the pool serves it, the old version drains), watched through a probation window (a failing health
probe, or real traffic failing more often than ``max_error_rate``, rolls it back), and old versions
beyond ``keep`` are removed. No WAN: the current version keeps serving, and the status says when the
last check succeeded."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from llmosd.registry.client import Registry, RegistryError, docker_credentials
from llmosd.registry.oci import Reference, parse_reference
from llmosd.registry.peers import Peer
from llmosd.registry.signing import trust_policy
from llmosd.registry.throttle import UNLIMITED, Throttle
from llmosd.registry.transfer import pull
from llmosd.runtime import LoadedModel, ProviderSelector, load
from llmosd.runtime.generator import TextGenerator
from llmosd.store import ModelStore, StoreError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0


@dataclass(frozen=True)
class Subscription:
    ref: Reference
    name: str | None  # store it under this name (default: the name it was pushed as)

    @classmethod
    def parse(cls, text: str) -> Subscription:
        ref, _, name = text.strip().partition("=")
        return cls(parse_reference(ref), name or None)


def parse_subscriptions(text: str) -> list[Subscription]:
    return [Subscription.parse(x) for x in text.split(",") if x.strip()]


@dataclass
class SubState:
    """What /api/status shows of one subscription."""

    ref: str
    last_checked: float | None = None
    last_success: float | None = None
    digest: str | None = None  # the digest now active from this subscription
    refused: dict[str, str] = field(default_factory=dict)  # digest -> why (not tried again)
    error: str | None = None
    failures: int = 0  # consecutive, for the backoff
    next_check: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "last_checked": self.last_checked,
            "last_success": self.last_success,
            "digest": self.digest,
            "refused": self.refused,
            "error": self.error,
            "next_check": self.next_check,
        }


def smoke_test(loaded: LoadedModel) -> None:
    """Run the loaded version on a sample input; raise unless every output is finite."""
    backend = loaded.backend
    if isinstance(backend, TextGenerator):
        logits, row = backend.lm.prefill(backend.encode("smoke test", special=False) or [0])
        backend.lm.free(row)
        values = np.asarray(logits)
    else:
        values = np.stack([o.values for o in backend.run(backend.prepare(["smoke test", "a second input"]))])
    if not np.all(np.isfinite(values)):
        raise ValueError("the model's outputs on a sample input are not finite")


@dataclass
class SyncPolicy:
    interval_s: float = 300.0
    probation_s: float = 60.0
    keep: int = 3  # versions kept per model (the active one always)
    insecure: frozenset[str] = frozenset()
    trust_dir: Path = Path("trust")
    allow_unsigned_from: str = ""
    ca_file: str = ""  # registries' CAs besides the system's
    max_error_rate: float = 0.05  # of real requests in probation, above which the version is rolled back


MIN_REQUESTS = 10  # real requests in probation before their error rate can condemn a version


class ProbationFailed(RuntimeError):
    pass


class Syncer:
    """Owns the sync task. ``activate(name)`` is the daemon's hook: serve the newly active version;
    ``probe(name)`` runs one request through it (raises on failure); ``outcomes(name)`` counts the real
    requests the served version answered and failed (None when it is not being served)."""

    def __init__(
        self,
        store: ModelStore,
        subscriptions: list[Subscription],
        policy: SyncPolicy,
        selector: ProviderSelector,
        activate: Callable[[str], Awaitable[None]],
        probe: Callable[[str], Awaitable[None]],
        throttle: Throttle = UNLIMITED,
        peers: Callable[[], Awaitable[list[Peer]]] | None = None,
        outcomes: Callable[[str], tuple[int, int] | None] | None = None,
    ) -> None:
        self.outcomes = outcomes
        self.throttle = throttle
        self.peers = peers
        self.store = store
        self.subscriptions = subscriptions
        self.policy = policy
        self.selector = selector
        self.activate = activate
        self.probe = probe
        self.states = {str(s.ref): SubState(str(s.ref)) for s in subscriptions}
        self.working: dict[str, str] = {}  # ref -> what is being done now (for the STATUS line)

    def status(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.states.values()]

    def describe(self) -> str:
        """What the sync is doing now, for a person ("" when idle)."""
        return "; ".join(f"syncing {ref}: {what}" for ref, what in self.working.items())

    async def run(self) -> None:
        """Until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                now = time.time()
                for sub in self.subscriptions:
                    st = self.states[str(sub.ref)]
                    if now >= st.next_check:
                        try:
                            await self.check(session, sub, st)
                        finally:
                            self.working.pop(str(sub.ref), None)
                wake = min(s.next_check for s in self.states.values())
                await asyncio.sleep(max(0.2, wake - time.time()))

    def _schedule(self, st: SubState, ok: bool) -> None:
        st.failures = 0 if ok else st.failures + 1
        base = self.policy.interval_s * (2 ** min(st.failures, 12) if st.failures else 1)
        st.next_check = time.time() + min(base, MAX_BACKOFF_S) * random.uniform(0.9, 1.1)

    async def check(self, session: aiohttp.ClientSession, sub: Subscription, st: SubState) -> None:
        st.last_checked = time.time()
        ref = sub.ref
        registry = Registry(
            ref.host,
            session,
            credentials=docker_credentials(ref.host),
            insecure=ref.host in self.policy.insecure,
            ca_file=self.policy.ca_file or None,
            throttle=self.throttle,
        )
        try:
            _, digest = await registry.get_manifest(ref.repo, ref.ref)
            if digest == st.digest or digest in st.refused:
                st.last_success, st.error = time.time(), None
                self._schedule(st, ok=True)
                return
            log.info("sync %s: new digest %s", ref, digest)
            self.working[str(ref)] = "pulling"
            trust = trust_policy(self.policy.trust_dir, self.policy.allow_unsigned_from, ref.host)
            peers = await self.peers() if self.peers is not None else []
            result = await pull(self.store, ref, registry, name=sub.name, activate=False, trust=trust, peers=peers)
        except (RegistryError, StoreError, aiohttp.ClientError, OSError, ValueError) as exc:
            st.error = f"{type(exc).__name__}: {exc}"
            log.warning("sync %s: %s (the current version keeps serving)", ref, st.error)
            self._schedule(st, ok=False)
            return
        st.last_success, st.error = time.time(), None
        self._schedule(st, ok=True)
        manifest = result.manifest
        if self.store.active_version(manifest.name) == manifest.version:
            st.digest = digest
            return
        self.working[str(ref)] = "smoke-testing"
        try:
            await asyncio.to_thread(self._smoke, manifest.name, manifest.version)
        except Exception as exc:
            st.refused[digest] = f"smoke test failed: {exc}"
            if self.store.active_version(manifest.name) != manifest.version:
                self.store.remove(manifest.name, manifest.version)  # never to be served: its files go
            log.error(
                "sync %s: %s:%s failed its smoke test (%s); not activated", ref, manifest.name, manifest.version, exc
            )
            return
        await self._activate(ref, st, digest, manifest.name, manifest.version)

    def _smoke(self, name: str, version: str) -> None:
        loaded = load(self.store, self.store.manifest(name, version), self.selector)
        smoke_test(loaded)

    async def _activate(self, ref: Reference, st: SubState, digest: str, name: str, version: str) -> None:
        previous = self.store.active_version(name)
        self.working[str(ref)] = f"{name}:{version} on probation"
        await asyncio.to_thread(self.store.activate, name, version)
        try:
            await self.activate(name)
            before = self.outcomes(name) if self.outcomes is not None else None
            deadline = time.monotonic() + self.policy.probation_s
            while time.monotonic() < deadline:
                await self.probe(name)
                self._check_traffic(name, before)
                await asyncio.sleep(min(1.0, self.policy.probation_s / 5))
            self._check_traffic(name, before)
        except Exception as exc:
            log.error("sync %s: %s:%s failed on probation (%s); rolling back to %s", ref, name, version, exc, previous)
            if previous is not None:
                await asyncio.to_thread(self.store.activate, name, previous)
                await self.activate(name)
            st.refused[digest] = f"failed on probation: {exc}"  # once the old version serves again
            return
        st.digest = digest
        log.info("sync %s: %s:%s active (was %s)", ref, name, version, previous)
        self._prune(name)

    def _check_traffic(self, name: str, before: tuple[int, int] | None) -> None:
        """ProbationFailed when real requests since activation failed too often."""
        now = self.outcomes(name) if self.outcomes is not None else None
        if before is None or now is None:
            return
        ok, failed = now[0] - before[0], now[1] - before[1]
        total = ok + failed
        if total >= MIN_REQUESTS and failed > self.policy.max_error_rate * total:
            raise ProbationFailed(
                f"{failed} of {total} requests failed ({failed / total:.0%}; at most "
                f"{self.policy.max_error_rate:.0%} allowed)"
            )

    def _prune(self, name: str) -> None:
        active = self.store.active_version(name)
        old = [v for v in self.store.versions(name) if v != active]
        for version in old[: max(0, len(old) - (self.policy.keep - 1))]:
            self.store.remove(name, version)
            log.info("sync: removed %s:%s (keeping %d versions)", name, version, self.policy.keep)
