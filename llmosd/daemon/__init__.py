"""The daemon's life: a chain of stages started in order and stopped in reverse.

config → hardware → store → heartbeat → loop watch → pool → routing → listeners → seed → sync → mDNS. Stopping undoes
them the other way round: the mDNS goodbye first, then the sync and the seeding, then the listeners drain
the requests in flight, then the router, the pool, the heartbeat (it pings through the drain), the store. SIGHUP hands a
re-read config to every stage; each applies the values it owns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable

from llmosd import __version__
from llmosd.api import AppState
from llmosd.api.state import Live
from llmosd.config import Config
from llmosd.daemon.chain import Chain, Stage
from llmosd.daemon.core import (
    HardwareStage,
    HeartbeatStage,
    LoopWatchStage,
    PoolStage,
    Settings,
    StoreStage,
    heartbeat,
)
from llmosd.daemon.lan import MdnsStage, SyncStage, lan_peers
from llmosd.daemon.listening import ListenerStage
from llmosd.daemon.models import SeedStage
from llmosd.daemon.routing import RouterStage
from llmosd.hardware import Hardware, probe
from llmosd.logs import setup_logging
from llmosd.loopwatch import LoopLag
from llmosd.readiness import Readiness
from llmosd.registry.access import Registries
from llmosd.reload import reconcile
from llmosd.routing.router import Router
from llmosd.runtime.memory import fix_mmap_threshold
from llmosd.seed import DEFAULT_MODELS
from llmosd.systemd import Notifier
from llmosd.tasks import Tasks, discover
from llmosd.tls.server import ServerTls
from llmosd.token import ensure_token
from llmosd.tokens import load_tokens
from llmosd.versions import ModelVersions

log = logging.getLogger("llmosd")


@dataclasses.dataclass
class Daemon:
    chain: Chain
    state: AppState
    listeners: ListenerStage
    notifier: Notifier


def build(config: Config, hw: Hardware, tasks: Tasks, notifier: Notifier) -> Daemon:
    """The stages, wired: each receives what it needs of the stages before it, and all of them the one
    set of hardware facts and the one set of installed tasks."""
    token = ensure_token(config.token_file)
    live = Live(config, token, load_tokens(config.token_file, token))
    defaults = tuple(d.name for d in DEFAULT_MODELS) if config.seed_defaults else ()
    readiness = Readiness()
    hardware = HardwareStage(live, hw, tasks)
    store = StoreStage(live)
    pool = PoolStage(live, store, hardware, defaults, tasks)
    versions = ModelVersions(
        store.store,
        pool.pool,
        registries=lambda: Registries.from_config(live.config, store.throttle),  # reloads may change them
        peers=lambda: lan_peers(st),
    )
    lag = LoopLag(config.loop_block_ms / 1000)
    st = AppState(
        live,
        store.store,
        pool.pool,
        versions,
        hw,
        readiness,
        store.throttle,
        store.install_id,
        defaults,
        lag=lag,
        tasks=tasks,
        router=Router(store.install_id),
    )
    listeners = ListenerStage(st, ServerTls())
    sync = SyncStage(st)
    beat = HeartbeatStage(readiness, notifier, lambda: chain.status())  # what the stages say (the sync's state)
    watch = LoopWatchStage(lag)
    routing = RouterStage(st)
    stages: list[Stage] = [Settings(live), hardware, store, beat, watch, pool, routing, listeners, SeedStage(st), sync]
    chain = Chain([*stages, MdnsStage(st, listeners)])
    return Daemon(chain, st, listeners, notifier)


async def apply_reload(daemon: Daemon, load: Callable[[], Config]) -> None:
    """Re-read the config (SIGHUP): every stage applies what it owns; what needs a restart is named."""
    st, notifier = daemon.state, daemon.notifier
    notifier.reloading()
    try:
        fresh = load()
    except Exception as exc:  # a typo in the file must not take the box down: keep running as before
        log.error("reload failed, the running config stays: %s", exc)
        notifier.ready(f"{st.status_line}; reload failed: {exc}")
        return
    change = reconcile(st.config, dataclasses.replace(fresh, **daemon.listeners.passed))
    st.live.config = change.config
    await daemon.chain.reload(change)
    if change.need_restart:
        log.warning("reload: %s changed but take effect only at a restart", ", ".join(change.need_restart))
    config = change.config
    log.info("reloaded %s: %s", config.config or "the config", ", ".join(change.applied) or "nothing changed")
    notifier.ready(st.status_line)


async def serve(
    config: Config, probe_hardware: Callable[[], Hardware] = probe, reload_config: Callable[[], Config] | None = None
) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config through ``reload_config``. ``probe_hardware``
    is injectable: tests pass fakes (a 2-GPU box...). 0 when every stage stopped cleanly."""
    where = setup_logging(config.log_level)
    heap = "large allocations mapped on their own" if fix_mmap_threshold() else "the C library's default heap"
    notifier = Notifier()
    log.info("llmosd %s starting (logging to %s; %s); config: %s", __version__, where, heap, config.redacted())
    if notifier.enabled:
        log.info(
            "sd_notify to %s (%s)%s", notifier.address, notifier.via, ", watchdog on" if notifier.watchdog_s else ""
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []
    daemon: Daemon | None = None
    try:
        # Blocking (NVML, a session per provider; the task packages' imports): in threads. Neither raises:
        # unknowns and broken task packages are reported.
        hw, tasks = await asyncio.gather(asyncio.to_thread(probe_hardware), asyncio.to_thread(discover))
        log.info("tasks: %s", ", ".join(f"{e.task.name} ({e.package})" for e in tasks.entries) or "none")
        daemon = build(config, hw, tasks, notifier)
        await daemon.chain.start()
        if reload_config is not None:
            running = daemon

            def on_hup() -> None:
                task = asyncio.create_task(apply_reload(running, reload_config))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, on_hup)
        await stop.wait()
        log.info("stopping: refusing new connections, draining in-flight requests")
        daemon.state.readiness.stop()
        notifier.stopping(daemon.state.status_line)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in reloads:
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        if daemon is not None:
            errors = await daemon.chain.stop()
        log.info("stopped%s", f" ({len(errors)} stage(s) failed to stop)" if errors else "")
    return 1 if errors else 0


__all__ = ["apply_reload", "build", "heartbeat", "serve"]
