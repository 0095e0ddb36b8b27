"""Background sync of subscribed tags (``REGISTRY/REPO:TAG[=NAME]``): each is polled on an interval with
jitter, backing off exponentially while the registry is unreachable. A new digest is pulled (signature
policy applied), smoke-tested (loaded through the pool in a session of its own and run on a sample
input), activated
(the pool serves it, the old version drains), watched through a probation window (a failing health
probe, or real traffic failing more often than ``max_error_rate``, rolls it back), and old versions
beyond ``keep`` are removed. No WAN: the current version keeps serving, and the status says when the
last check succeeded."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llmosd.registry.client import RegistryError
from llmosd.registry.oci import Reference, parse_reference
from llmosd.registry.transfer import pull
from llmosd.store import StoreError
from llmosd.versions.service import ModelVersions

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


@dataclass
class SyncPolicy:
    interval_s: float = 300.0
    probation_s: float = 60.0
    keep: int = 3  # versions kept per model (the active one always)
    max_error_rate: float = 0.05  # of real requests in probation, above which the version is rolled back


MIN_REQUESTS = 10  # real requests in probation before their error rate can condemn a version


class ProbationFailed(RuntimeError):
    pass


class Syncer:
    """Owns the sync task; pulls, smoke tests, activations, probes and rollbacks go through ``versions``."""

    def __init__(self, versions: ModelVersions, subscriptions: list[Subscription], policy: SyncPolicy) -> None:
        self.versions = versions
        self.store = versions.store
        self.subscriptions = subscriptions
        self.policy = policy
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
        registries = self.versions.registries()
        registry = registries.open(ref.host, session)
        try:
            _, digest = await registry.get_manifest(ref.repo, ref.ref)
            if digest == st.digest or digest in st.refused:
                st.last_success, st.error = time.time(), None
                self._schedule(st, ok=True)
                return
            log.info("sync %s: new digest %s", ref, digest)
            self.working[str(ref)] = "pulling"
            trust, peers = registries.trust(ref.host), self.versions.peers()
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
            await self.versions.smoke_test(manifest.name, manifest.version)
        except Exception as exc:
            st.refused[digest] = f"smoke test failed: {exc}"
            if self.store.active_version(manifest.name) != manifest.version:
                self.store.remove(manifest.name, manifest.version)  # never to be served: its files go
            log.error(
                "sync %s: %s:%s failed its smoke test (%s); not activated", ref, manifest.name, manifest.version, exc
            )
            return
        await self._activate(ref, st, digest, manifest.name, manifest.version)

    async def _activate(self, ref: Reference, st: SubState, digest: str, name: str, version: str) -> None:
        previous = self.store.active_version(name)
        self.working[str(ref)] = f"{name}:{version} on probation"
        await asyncio.to_thread(self.store.activate, name, version)
        try:
            await self.versions.load(name)
            before = self.versions.outcomes(name)
            deadline = time.monotonic() + self.policy.probation_s
            while time.monotonic() < deadline:
                await self.versions.probe(name)
                self._check_traffic(name, before)
                await asyncio.sleep(min(1.0, self.policy.probation_s / 5))
            self._check_traffic(name, before)
        except Exception as exc:
            log.error("sync %s: %s:%s failed on probation (%s); rolling back to %s", ref, name, version, exc, previous)
            if previous is not None:
                await asyncio.to_thread(self.store.activate, name, previous)
                await self.versions.load(name)
            st.refused[digest] = f"failed on probation: {exc}"  # once the old version serves again
            return
        st.digest = digest
        log.info("sync %s: %s:%s active (was %s)", ref, name, version, previous)
        self._prune(name)

    def _check_traffic(self, name: str, before: tuple[int, int] | None) -> None:
        """ProbationFailed when real requests since activation failed too often."""
        now = self.versions.outcomes(name)
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
