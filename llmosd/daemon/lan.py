"""The stages that talk to other machines: the registry sync and the mDNS advertiser. Both start their
work once the models are prepared (a box still seeding neither pulls updates nor invites clients)."""

from __future__ import annotations

import asyncio
import logging
import socket

from llmosd import __version__
from llmosd.api import AppState
from llmosd.config import items
from llmosd.daemon.chain import Stage, cancel
from llmosd.daemon.listening import ListenerStage
from llmosd.discovery.advertise import Advertiser, is_loopback
from llmosd.discovery.txt import txt_records
from llmosd.registry.peers import Peer
from llmosd.reload import SYNC, Reload
from llmosd.versions import Syncer, SyncPolicy, parse_subscriptions

log = logging.getLogger("llmosd")


def lan_peers(st: AppState) -> list[Peer]:
    """Other appliances to ask for blobs first: only when this one is on the LAN itself (advertising),
    and those its advertiser has heard on the interfaces it advertises on."""
    if not st.config.peer_cache or st.advertiser is None:
        return []
    return [Peer(a.url, st.token, a.name, a.fingerprint) for a in st.advertiser.neighbours()]


def make_syncer(st: AppState) -> Syncer | None:
    """The registry sync, if the config subscribes to anything."""
    config = st.config
    subscriptions = parse_subscriptions(config.subscriptions)
    if not subscriptions:
        return None
    policy = SyncPolicy(
        interval_s=config.sync_interval_s,
        probation_s=config.probation_s,
        keep=config.keep_versions,
        max_error_rate=config.probation_max_error_rate,
    )
    return Syncer(st.versions, subscriptions, policy)


class SyncStage(Stage):
    name = "sync"

    def __init__(self, state: AppState) -> None:
        self.st = state
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._run(after_prepared=True)

    def _run(self, after_prepared: bool) -> None:
        syncer = self.st.live.syncer = make_syncer(self.st)
        if syncer is None:
            return

        async def run() -> None:
            if after_prepared:
                await self.st.readiness.wait_prepared()
            await syncer.run()

        self._task = asyncio.create_task(run())

    async def reload(self, change: Reload) -> None:
        if set(change.applied) & SYNC:
            await self.stop()
            self._run(after_prepared=False)

    def status(self) -> str:
        syncer = self.st.live.syncer
        return syncer.describe() if syncer is not None else ""

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None


def txt_content(st: AppState) -> dict[str, str]:
    """What the TXT records say now: the models served and the devices they run on."""
    served = st.pool.served()
    devices = sorted({d for s in served for d in s.devices})
    if not devices:
        devices = ["cuda:0"] if st.hardware.gpus and st.hardware.cuda == "loads" else ["cpu"]
    return txt_records(
        install_id=st.install_id,
        version=__version__,
        auth=True,  # LAN clients always need the token (only loopback and the Unix socket go without)
        models=[s.name for s in served],
        devices=devices,
        fingerprint=st.live.tls.certificate.fingerprint if st.live.tls and st.live.tls.certificate else "",
    )


async def advertise(st: AppState, port: int) -> None:
    """Advertise over mDNS once the models are prepared, until cancelled (then a goodbye goes out)."""
    config = st.config
    if not config.mdns:
        log.info("mDNS: advertising is off (mdns = false)")
        return
    if is_loopback(config.host):
        log.info(
            "mDNS: not advertising: the TCP listener is on %s, which no LAN client can reach "
            '(set host = "0.0.0.0" to serve the LAN)',
            config.host,
        )
        return
    interfaces = items(config.mdns_interfaces)
    await st.readiness.wait_prepared()
    name = config.mdns_name or socket.gethostname()
    advertiser = Advertiser(name, st.install_id, port, config.host, lambda: txt_content(st), interfaces)
    st.pool.watchers.append(advertiser.changed)
    task = asyncio.create_task(advertiser.run())
    registered = asyncio.create_task(advertiser.registered.wait())
    try:
        await asyncio.wait([task, registered], return_when=asyncio.FIRST_COMPLETED)
        if advertiser.registered.is_set():
            st.live.advertiser = advertiser
        await task
    finally:
        st.live.advertiser = None
        registered.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class MdnsStage(Stage):
    """Last in the chain, so first to stop: the goodbye goes out before the drain, and LAN clients stop
    choosing this box while it finishes what it has."""

    name = "mdns"

    def __init__(self, state: AppState, listeners: ListenerStage) -> None:
        self.st, self.listeners = state, listeners
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.listeners.tcp_port:
            self._task = asyncio.create_task(advertise(self.st, self.listeners.tcp_port))

    async def stop(self) -> None:
        await cancel(self._task)
