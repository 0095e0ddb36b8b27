"""The stages every daemon has: the config's live values, the hardware, the store, the pool, the heartbeat."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from llmosd.api.state import Live
from llmosd.config import Config
from llmosd.daemon.chain import Stage, cancel
from llmosd.discovery.advertise import install_id
from llmosd.hardware import Hardware
from llmosd.logs import set_level
from llmosd.loopwatch import LoopLag
from llmosd.readiness import Phase, Readiness
from llmosd.registry.throttle import Throttle
from llmosd.reload import BATCHING, Reload
from llmosd.runtime import Loader, ProviderSelector
from llmosd.scheduler import BatchPolicy, GenerationLimits, ModelPool
from llmosd.scheduler.tuning import Tuner, TuningPolicy
from llmosd.store import ModelStore, sweep_tmp
from llmosd.systemd import Notifier
from llmosd.tasks import Tasks
from llmosd.token import ensure_token
from llmosd.tokens import load_tokens

log = logging.getLogger("llmosd")


def batch_policy(config: Config) -> BatchPolicy:
    return BatchPolicy(
        max_batch=config.max_batch_size,
        max_tokens=config.max_batch_tokens,
        run_cost_tokens=config.batch_run_cost_tokens,
        max_delay_s=config.max_queue_delay_ms / 1000,
        max_queue=config.max_queue,
    )


def generation_limits(config: Config) -> GenerationLimits:
    return GenerationLimits(
        max_sequences=config.max_sequences,
        kv_cache_bytes=config.kv_cache_mb << 20,
        max_queue=config.max_queue,
        prefix_cache_bytes=config.prefix_cache_mb << 20,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
    )


def describe_hardware(hw: Hardware) -> str:
    gpus = ", ".join(f"{g.device_id} {g.name}" for g in hw.gpus) or f"no GPU ({hw.nvml})"
    providers = ", ".join(p.name.removesuffix("ExecutionProvider") for p in hw.providers if p.available)
    kernels = "/".join(hw.cpu.kernels) or "baseline"
    cpu = f"{hw.cpu.physical_cores} cores {hw.cpu.arch} [{' '.join(hw.cpu.isa)}], kernels {kernels}"
    return f"{cpu}; {gpus}; ORT providers: {providers}"


class Settings(Stage):
    """The values every handler reads afresh: the log level and the access tokens (the tokens file is
    read again at every reload: ``llmosd tokens add`` / ``revoke`` then SIGHUP)."""

    name = "settings"

    def __init__(self, live: Live) -> None:
        self.live = live

    async def reload(self, change: Reload) -> None:
        if "log_level" in change.applied:
            set_level(change.config.log_level)
        token_file = change.config.token_file
        try:
            token = ensure_token(token_file) if "token_file" in change.applied else self.live.token
            tokens = await asyncio.to_thread(load_tokens, token_file, token)
        except (OSError, ValueError) as exc:  # a broken file must not open the door or close the box
            log.error("reload: the tokens stay as they were: %s", exc)
            return
        self.live.token, self.live.tokens = token, tokens
        log.info("tokens: %d named, besides the token file's", len(tokens.named))


class HardwareStage(Stage):
    """The probe's facts (probed before the stages are built: everything below is built from them) and
    the provider choice they give: CUDA only where the probe created a session on it."""

    name = "hardware"

    def __init__(self, live: Live, hardware: Hardware, tasks: Tasks) -> None:
        self.hardware = hardware
        config = live.config
        selector = ProviderSelector(config.device, config.threads or None, config.ort_spinning, hardware.cuda)
        self.sessions = Loader(selector, tasks.adapters())

    async def start(self) -> None:
        log.info("hardware: %s", describe_hardware(self.hardware))


class StoreStage(Stage):
    """The model store, this install's id, and the bandwidth every pull shares."""

    name = "store"

    def __init__(self, live: Live) -> None:
        config = live.config
        self.store = ModelStore(config.state_dir)
        self.throttle = Throttle(config.pull_bandwidth_mb_s * 1e6)
        self.install_id = install_id(config.state_dir)

    async def start(self) -> None:
        sweep_tmp(self.store)  # what a killed pull or export left behind

    async def reload(self, change: Reload) -> None:
        if "pull_bandwidth_mb_s" in change.applied:
            self.throttle.rate = self.throttle.tokens = change.config.pull_bandwidth_mb_s * 1e6


class PoolStage(Stage):
    """The models being served, placed on the probed hardware, and their keep_alive reaper."""

    name = "pool"

    def __init__(
        self, live: Live, store: StoreStage, hardware: HardwareStage, pinned: tuple[str, ...], tasks: Tasks
    ) -> None:
        self.live, self.pinned = live, pinned
        config, hw = live.config, hardware.hardware
        policy = TuningPolicy(
            config.autotune,
            config.latency_budget_ms,
            max_sequences=config.max_sequences,
            kv_cache_bytes=config.kv_cache_mb << 20,
            budgets_ms={name: task.latency_budget_ms for name, task in tasks.items()},
        )
        self.pool = ModelPool(
            store.store,
            hw,
            hardware.sessions,
            batch_policy(config),
            generation_limits(config),
            config.context_length,
            Tuner(store.store, hw, policy),
            config.instances,
        )
        self._reaping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.pool.pinned = set(self.pinned)
        self._reap(self.live.config.keep_alive_s)

    def _reap(self, keep_alive_s: float) -> None:
        if self._reaping is not None:
            self._reaping.cancel()
        self._reaping = asyncio.create_task(self.pool.async_keep_alive(keep_alive_s))

    async def reload(self, change: Reload) -> None:
        if set(change.applied) & BATCHING:
            self.pool.set_policy(batch_policy(change.config))
        if "keep_alive_s" in change.applied:
            self._reap(change.config.keep_alive_s)

    async def stop(self) -> None:
        await cancel(self._reaping)
        await self.pool.close()


async def heartbeat(readiness: Readiness, notifier: Notifier, more: Callable[[], str]) -> None:
    """Driven by the event loop itself, so a blocked loop stops it: watchdog pings, the STATUS line at
    each step and every interval (the readiness line, then what ``more`` says: the sync's state), READY=1
    once the models are prepared, and more start-up time while a first-start export runs."""
    interval = min(1.0, notifier.watchdog_s / 4) if notifier.watchdog_s else 1.0
    told_ready = False
    last_extend = float("-inf")  # monotonic time starts near 0 at boot
    while True:
        if notifier.watchdog_s:
            notifier.watchdog()
        extra = more()
        status = f"{readiness.line}; {extra}" if extra else readiness.line
        if not told_ready and readiness.prepared:
            notifier.ready(status)
            told_ready = True
        else:
            notifier.status(status)
        now = time.monotonic()
        if not told_ready and readiness.phase is Phase.EXPORTING and now - last_extend > 10:
            notifier.extend_timeout(60)  # an export takes minutes; the start timeout is for a hang
            last_extend = now
        await readiness.changed(interval)


class HeartbeatStage(Stage):
    """systemd's view of the daemon. Stopped late: it pings through the drain (a long drain is no hang)."""

    name = "heartbeat"

    def __init__(self, readiness: Readiness, notifier: Notifier, more: Callable[[], str]) -> None:
        self.readiness, self.notifier, self.more = readiness, notifier, more
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(heartbeat(self.readiness, self.notifier, self.more))

    async def stop(self) -> None:
        await cancel(self._task)


class LoopWatchStage(Stage):
    """The event loop's own check: a wake-up later than ``loop_block_ms`` is logged and counted."""

    name = "loop watch"

    def __init__(self, lag: LoopLag) -> None:
        self.lag = lag
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.lag.watch())

    async def reload(self, change: Reload) -> None:
        if "loop_block_ms" in change.applied:
            await cancel(self._task)
            self.lag.limit_s = change.config.loop_block_ms / 1000
            await self.start()

    async def stop(self) -> None:
        await cancel(self._task)
