"""The router's stage: its HTTP client, its upstreams from the config (the key and token files read at
start and at every reload), and the loop that follows the LAN and checks each upstream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from llmosd.api import AppState
from llmosd.config import Config
from llmosd.daemon.chain import Stage, cancel
from llmosd.discovery.txt import Appliance
from llmosd.reload import ROUTING, Reload
from llmosd.routing.upstreams import LanTokens, Upstream, openai_base, openai_name, read_secret

log = logging.getLogger("llmosd")


def openai_upstream(config: Config) -> Upstream | None:
    """The OpenAI-compatible upstream the config names (OSError/ValueError: its key file is unusable)."""
    url = config.openai_upstream_url
    if not url:
        return None
    key = read_secret(config.openai_upstream_key_file)
    return Upstream("openai", openai_name(url, config.openai_upstream_name), openai_base(url), key)


class RouterStage(Stage):
    name = "routing"

    def __init__(self, state: AppState) -> None:
        self.st = state
        self.tokens = LanTokens()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.st.router.start()
        await self._configure(self.st.config)
        self._task = asyncio.create_task(self.st.router.run(self._lan, lambda: self.tokens))

    async def _configure(self, config: Config) -> None:
        """Read the secrets (in a thread: files). A file that cannot be read is named in the journal and
        its upstream left out: the box serves on, locally."""
        try:
            upstream = await asyncio.to_thread(openai_upstream, config)
        except (OSError, ValueError) as exc:
            log.error("routing: openai_upstream_url is left out: its key file: %s", exc)
            upstream = None
        self.st.router.set_openai(upstream)
        try:
            self.tokens = await asyncio.to_thread(LanTokens.read, config.lan_token_file, self.st.token)
        except (OSError, ValueError) as exc:
            log.error("routing: LAN peers get this box's own token: lan_token_file: %s", exc)
            self.tokens = LanTokens(self.st.token)
        if config.routes.routes_anything:
            ups = ", ".join(u.route for u in self.st.router.upstreams()) or "none yet"
            lan = "on" if config.lan_upstreams else "off"
            log.info("routing: route = %s; LAN peers %s; upstreams: %s", config.route, lan, ups)

    def _lan(self) -> Sequence[Appliance] | None:
        if not self.st.config.lan_upstreams:
            return None
        advertiser = self.st.advertiser
        return advertiser.neighbours() if advertiser is not None else []

    async def reload(self, change: Reload) -> None:
        if set(change.applied) & ROUTING:
            await self._configure(change.config)

    def status(self) -> str:
        down = [u.route for u in self.st.router.upstreams() if not u.health.up]
        return f"upstreams down: {', '.join(down)}" if down and self.st.config.routes.routes_anything else ""

    async def stop(self) -> None:
        await cancel(self._task)
        await self.st.router.close()
