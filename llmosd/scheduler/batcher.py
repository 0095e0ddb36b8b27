"""Dynamic batching for one model (Triton's rule, Infinity's backend split).

Requests queue on the event loop. A single worker takes a window of them as soon as the model is free
(or once the oldest has waited ``max_delay``), and a worker thread prepares the window, orders it by
length, runs it as a few low-padding batches and resolves each request as soon as its own items are done.
An exception fails exactly the requests of its window; a full queue is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic

from llmosd.runtime.backend import Backend, Output, P
from llmosd.scheduler.planning import plan_batches, retry_after_s

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(f"model {model!r} is busy: its queue is full")
        self.retry_after = retry_after


class BatcherClosed(Exception):
    pass


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_tokens: int = 8192
    max_waste: float = 0.25
    max_delay_s: float = 0.0  # 0: batch whatever queued while the model was busy, add no latency
    max_queue: int = 1024  # items waiting, not yet taken by the worker


@dataclass
class BatchStats:
    requests: int = 0
    items: int = 0
    batches: int = 0
    windows: int = 0
    failed_batches: int = 0
    rejected: int = 0
    largest_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    items_per_s: float = 0.0  # exponentially weighted service rate, for Retry-After

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "items": self.items,
            "batches": self.batches,
            "windows": self.windows,
            "failed_batches": self.failed_batches,
            "rejected": self.rejected,
            "largest_batch": self.largest_batch,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "items_per_s": round(self.items_per_s, 1),
        }


@dataclass
class _Request:
    inputs: Sequence[str]
    future: asyncio.Future[list[Output]]
    enqueued: float


class DynamicBatcher(Generic[P]):
    def __init__(self, name: str, backend: Backend[P], policy: BatchPolicy | None = None) -> None:
        self.name = name
        self.backend = backend
        self.policy = policy or BatchPolicy()
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return self._queued_items

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._async_work(), name=f"batcher-{self.name}")
        self._worker.add_done_callback(self._on_worker_done)

    def _on_worker_done(self, task: asyncio.Task[None]) -> None:
        # Supervisor: a worker that died (a bug, not a model error) must not strand queued requests.
        if task.cancelled() or self._closed:
            return
        log.error("batch worker for %s died: %r; restarting", self.name, task.exception())
        self._fail_queued(RuntimeError("the batch worker restarted; retry the request"))
        self.start()

    async def submit(self, inputs: Sequence[str]) -> list[Output]:
        if self._closed:
            raise BatcherClosed(f"model {self.name!r} is unloading")
        if self._queued_items + len(inputs) > self.policy.max_queue and self._queue:
            self.stats.rejected += 1
            raise QueueFull(self.name, retry_after_s(self._queued_items, self.stats.items_per_s))
        future: asyncio.Future[list[Output]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(inputs, future, time.monotonic()))
        self._queued_items += len(inputs)
        self.stats.requests += 1
        self._wakeup.set()
        return await future

    async def _async_work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._async_wait_for_window()
                window = self._take_window()
                if window:
                    self.stats.windows += 1
                    await loop.run_in_executor(self._executor, self._run_window, loop, window)

    async def _async_wait_for_window(self) -> None:
        delay = self.policy.max_delay_s
        while delay > 0 and self._queued_items < self.policy.max_batch:
            remaining = self._queue[0].enqueued + delay - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_window(self) -> list[_Request]:
        window: list[_Request] = []
        taken = 0
        while self._queue and (not window or taken + len(self._queue[0].inputs) <= self.policy.max_batch):
            req = self._queue.popleft()
            self._queued_items -= len(req.inputs)
            if req.future.done():  # cancelled while queued: skip the work
                continue
            window.append(req)
            taken += len(req.inputs)
        return window

    def _run_window(self, loop: asyncio.AbstractEventLoop, window: list[_Request]) -> None:
        """Worker thread: prepare, plan, run; resolve each request when its last item is done."""
        started = time.perf_counter()
        owners: list[tuple[int, int]] = []  # flat item -> (request index, position)
        prepared: list[Sized] = []
        missing = [len(req.inputs) for req in window]
        for r, req in enumerate(window):
            try:  # a request whose inputs cannot be prepared fails alone
                items = self.backend.prepare(req.inputs)
            except Exception as exc:
                missing[r] = -1
                self._fail(loop, [req], exc)
                continue
            prepared.extend(items)
            owners.extend((r, k) for k in range(len(items)))
        results: list[list[Output | None]] = [[None] * len(req.inputs) for req in window]
        p = self.policy
        for batch in plan_batches([len(x) for x in prepared], p.max_batch, p.max_tokens, p.max_waste):
            pending = [owners[i] for i in batch]
            if all(missing[r] < 0 for r, _ in pending):
                continue  # every owner already failed
            try:
                outputs = self.backend.run([prepared[i] for i in batch])  # type: ignore[misc]
            except Exception as exc:
                self.stats.failed_batches += 1
                failed = {r for r, _ in pending if missing[r] >= 0}
                for r in failed:
                    missing[r] = -1
                self._fail(loop, [window[r] for r in failed], exc)
                continue
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.batch_sizes[len(batch)] += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for (r, k), out in zip(pending, outputs, strict=True):
                if missing[r] < 0:
                    continue
                results[r][k] = out
                missing[r] -= 1
                if missing[r] == 0:
                    loop.call_soon_threadsafe(_resolve, window[r].future, results[r])
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            rate = len(prepared) / elapsed
            s = self.stats
            s.items_per_s = rate if s.items_per_s == 0 else 0.8 * s.items_per_s + 0.2 * rate

    @staticmethod
    def _fail(loop: asyncio.AbstractEventLoop, requests: Sequence[_Request], exc: BaseException) -> None:
        log.warning("batch failed for %d request(s): %r", len(requests), exc)
        for req in requests:
            loop.call_soon_threadsafe(_reject, req.future, exc)

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            req = self._queue.popleft()
            if not req.future.done():
                req.future.set_exception(exc)
        self._queued_items = 0

    async def close(self) -> None:
        """Refuse new work, fail what is still queued, stop the worker and its thread."""
        self._closed = True
        self._fail_queued(BatcherClosed(f"model {self.name!r} is unloading"))
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        # Let a window already in the thread finish (it resolves its own requests), then let the thread go.
        await asyncio.wrap_future(self._executor.submit(lambda: None))
        self._executor.shutdown(wait=False)


def _resolve(future: asyncio.Future[list[Output]], values: list[Output | None]) -> None:
    if not future.done():
        future.set_result([v for v in values if v is not None])


def _reject(future: asyncio.Future[list[Output]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
