"""The one router: which upstreams exist, which are up and what they serve (a check loop with backoff),
the plan for a request, and the forwarding of it. The api asks it; it never imports the api."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from llmosd.discovery.txt import Appliance
from llmosd.routing.policy import Candidate, Local, Plan, plan
from llmosd.routing.proxy import NotAccepted, forward
from llmosd.routing.upstreams import LanTokens, Upstream
from llmosd.routing.usage import Tally

log = logging.getLogger("llmosd.routing")

CHECK_EVERY_S = 5.0  # an upstream that is up is checked this often (its models, its health)
CHECK_TIMEOUT_S = 5.0
TICK_S = 0.5


class Router:
    def __init__(self, hop: str = "") -> None:
        self.hop = hop  # this install's id, on what it forwards (a forwarded request is not routed again)
        self.lan: dict[str, Upstream] = {}  # by route
        self.openai: Upstream | None = None
        self.session: aiohttp.ClientSession | None = None
        self.routed: Counter[tuple[str, str]] = Counter()  # (model label, route) -> requests
        self.generated: Counter[tuple[str, str]] = Counter()  # (model, route) -> tokens its answers report
        self._checking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads: set[asyncio.Task[None]] = set()  # models loading here while a peer answers for them

    # what exists

    def upstreams(self) -> list[Upstream]:
        return [*self.lan.values(), *([self.openai] if self.openai else [])]

    def upstream(self, route: str) -> Upstream | None:
        return next((u for u in self.upstreams() if u.route == route), None)

    def set_openai(self, upstream: Upstream | None) -> None:
        old = self.openai
        if old is not None and upstream is not None and old.same_place(upstream):
            old.name = upstream.name  # its health and answer times carry over
            return
        self.openai = upstream
        if upstream is not None:
            log.info("routing: upstream %s at %s", upstream.route, upstream.base_url)

    def sync_lan(self, appliances: Sequence[Appliance] | None, tokens: LanTokens) -> None:
        """The LAN upstreams are the appliances heard now (``None``: LAN routing is off)."""
        fresh: dict[str, Upstream] = {}
        for a in appliances or ():
            u = Upstream("lan", a.name, a.url, tokens.for_peer(a.name, a.id), a.fingerprint)
            old = self.lan.get(u.route)
            if old is not None and old.same_place(u):
                fresh[u.route] = old
                continue
            u.models = dict.fromkeys(a.models, True)  # the TXT names what it has loaded; the check says more
            fresh[u.route] = u
            log.info("routing: LAN peer %s at %s", u.route, u.base_url)
        for route in self.lan.keys() - fresh.keys():
            log.info("routing: LAN peer %s is gone", route)
        self.lan = fresh

    # choosing

    def candidates(self, model: str) -> list[Candidate]:
        """The upstreams that are up and list the model: LAN peers with it loaded (the least busy first),
        then LAN peers that have it stored, then the OpenAI-compatible upstream (it may cost money)."""
        lan = sorted(
            ((u, c) for u in self.lan.values() if (c := u.candidate(model)) is not None),
            key=lambda uc: (not uc[1].loaded, uc[0].in_flight, uc[1].answer_s, uc[0].name),
        )
        cloud = self.openai.candidate(model) if self.openai is not None else None
        return [c for _, c in lan] + ([cloud] if cloud is not None else [])

    def plan(self, model: str, policy: str, local: Local) -> Plan:
        return plan(policy, local, self.candidates(model))

    async def forward(
        self, request: web.Request, body: bytes, route: str, tally: Tally | None = None
    ) -> web.StreamResponse:
        upstream = self.upstream(route)
        if upstream is None or self.session is None:  # gone from the LAN since the plan was made
            raise NotAccepted(Upstream("lan", route, ""), "gone")
        try:
            return await forward(self.session, request, body, upstream, self.hop, tally)
        except NotAccepted as exc:
            if exc.connect:
                upstream.health.failed(exc.why)
                log.warning("routing: %s is down (%s); skipped until a check answers", route, exc.why)
            raise

    def down_with(self, model: str) -> list[str]:
        """The upstreams that are down but listed the model when last up."""
        return [u.route for u in self.upstreams() if not u.health.up and model in u.models]

    def reachable(self) -> dict[str, list[tuple[str, bool]]]:
        """Every model an upstream that is up lists, with the routes that reach it and whether loaded."""
        out: dict[str, list[tuple[str, bool]]] = {}
        for u in self.upstreams():
            if u.health.up:
                for model, loaded in sorted(u.models.items()):
                    out.setdefault(model, []).append((u.route, loaded))
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [u.describe() for u in self.upstreams()]

    # keeping track

    async def run(self, lan: Callable[[], Sequence[Appliance] | None], tokens: Callable[[], LanTokens]) -> None:
        """Until cancelled: follow the LAN's appliances and check each upstream when it is due."""
        while True:
            try:
                self.sync_lan(lan(), tokens())
            except Exception:  # a bad record must not end the checks of every upstream
                log.exception("routing: reading the LAN's appliances failed; keeping the last ones")
            for u in self.upstreams():
                if u.route not in self._checking and u.health.due(CHECK_EVERY_S):
                    self._checking.add(u.route)
                    task = asyncio.create_task(self._check(u))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(TICK_S)

    async def _check(self, u: Upstream) -> None:
        was_up = u.health.up
        try:
            assert self.session is not None
            u.models = await asyncio.wait_for(self._models(self.session, u), CHECK_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            u.health.failed(str(exc) or type(exc).__name__)
            if was_up or u.health.failures == 1:
                log.warning(
                    "routing: %s is down: %s (next check in %.0f s)",
                    u.route,
                    u.health.last_error,
                    u.health.retry_at - u.health.checked,
                )
        else:
            u.health.ok()
            if not was_up:
                log.info("routing: %s is up: %d model(s): %s", u.route, len(u.models), ", ".join(sorted(u.models)))
        finally:
            self._checking.discard(u.route)

    @staticmethod
    async def _models(session: aiohttp.ClientSession, u: Upstream) -> dict[str, bool]:
        """What it serves, which is also its health check: an llmosd peer's /readyz, then its /v1/models
        (loaded or not); an OpenAI-compatible server's /models (listed counts as loaded)."""
        if u.kind == "lan":
            async with session.get(u.url("/readyz"), ssl=u.ssl) as r:
                if r.status != 200:
                    raise ValueError(f"/readyz answered {r.status}")
        async with session.get(u.url("/v1/models"), headers=u.headers(), ssl=u.ssl) as r:
            if r.status in (401, 403):
                which = "openai_upstream_key_file" if u.kind == "openai" else "lan_token_file"
                raise ValueError(f"/v1/models refused llmosd's credentials ({r.status}): check {which}")
            if r.status != 200:
                raise ValueError(f"/v1/models answered {r.status}")
            doc = await r.json(content_type=None)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise ValueError("/v1/models is not an OpenAI model list")
        cards = [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)]
        return {c["id"]: bool(c.get("loaded", True)) for c in cards}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def close(self) -> None:
        tasks = [*self._tasks, *self.loads]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()
            self.session = None
