"""Dynamic batching for one model (Triton's rules, Infinity's backend split, continuous formation).

Requests queue on the event loop. A worker thread keeps a pool of prepared (tokenised) items; at each
step it admits what queued meanwhile, runs one batch (the oldest item plus the neighbours in length
that make the run cheapest, see ``planning.choose_batch``) and resolves every request whose last item
is done. New requests thus join between runs, and a long request never holds short ones behind it.
An exception fails exactly the requests it touched; a full queue is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic

from llmosd.runtime.backend import Backend, Output, P
from llmosd.scheduler.planning import choose_batch, retry_after_s

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
    run_cost_tokens: int = 48  # fixed cost of one session run, in tokens of work (see planning)
    max_delay_s: float = 0.0  # 0: batch whatever queued while the model was busy, add no latency
    max_queue: int = 1024  # items waiting (queued or prepared, not yet run)


@dataclass
class BatchStats:
    requests: int = 0
    items: int = 0
    batches: int = 0
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
    results: list[Output | None] = field(default_factory=list)
    missing: int = 0  # items not yet run; -1 once failed (worker thread only)


@dataclass
class _Item:
    request: _Request
    position: int
    prepared: Sized
    length: int
    order: int  # admission order: the oldest item has the lowest


class DynamicBatcher(Generic[P]):
    def __init__(self, name: str, backend: Backend[P], policy: BatchPolicy | None = None) -> None:
        self.name = name
        self.backend = backend
        self.policy = policy or BatchPolicy()
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._pool: list[_Item] = []  # worker thread only
        self._pooled_items = 0  # written by the worker thread, read by the loop
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return self._queued_items + self._pooled_items

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
        if self.queued + len(inputs) > self.policy.max_queue and self.queued:
            self.stats.rejected += 1
            raise QueueFull(self.name, retry_after_s(self.queued, self.stats.items_per_s))
        future: asyncio.Future[list[Output]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(inputs, future, time.monotonic()))
        self._queued_items += len(inputs)
        self.stats.requests += 1
        self._wakeup.set()
        return await future

    async def _async_work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self._pooled_items:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._async_wait_for_batch()
            admitted = self._take_queued()
            await loop.run_in_executor(self._executor, self._step, loop, admitted)

    async def _async_wait_for_batch(self) -> None:
        """With ``max_delay_s`` > 0 and an idle model, wait that long for a fuller first batch."""
        delay = self.policy.max_delay_s
        while delay > 0 and self._queue and self._pooled_items == 0 and self._queued_items < self.policy.max_batch:
            remaining = self._queue[0].enqueued + delay - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_queued(self) -> list[_Request]:
        """Hand queued requests to the worker, keeping its pool to a few batches' worth of items."""
        room = 4 * self.policy.max_batch - self._pooled_items
        taken: list[_Request] = []
        while self._queue and (not taken or len(self._queue[0].inputs) <= room):
            req = self._queue.popleft()
            self._queued_items -= len(req.inputs)
            if req.future.done():  # cancelled while queued: skip the work
                continue
            taken.append(req)
            room -= len(req.inputs)
        return taken

    # ---- worker thread ----
    def _admit(self, loop: asyncio.AbstractEventLoop, requests: list[_Request]) -> None:
        for req in requests:
            try:  # a request whose inputs cannot be prepared fails alone
                items = self.backend.prepare(req.inputs)
            except Exception as exc:
                req.missing = -1
                self._fail(loop, [req], exc)
                continue
            req.results = [None] * len(items)
            req.missing = len(items)
            order = next(self._order)
            self._pool.extend(_Item(req, k, x, len(x), order) for k, x in enumerate(items))

    def _step(self, loop: asyncio.AbstractEventLoop, admitted: list[_Request]) -> None:
        self._admit(loop, admitted)
        # Drop items whose request is already answered (failed, or cancelled by a departed client).
        self._pool = [it for it in self._pool if it.request.missing >= 0 and not it.request.future.done()]
        if self._pool:
            self._pool.sort(key=lambda it: it.length)
            oldest = min(range(len(self._pool)), key=lambda k: self._pool[k].order)
            p = self.policy
            i, j = choose_batch([it.length for it in self._pool], oldest, p.max_batch, p.max_tokens, p.run_cost_tokens)
            batch = self._pool[i:j]
            del self._pool[i:j]
            self._run(loop, batch)
        self._pooled_items = len(self._pool)

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = self.backend.run([it.prepared for it in batch])  # type: ignore[misc]
        except Exception as exc:
            self.stats.failed_batches += 1
            failed = list({id(it.request): it.request for it in batch if it.request.missing >= 0}.values())
            for req in failed:
                req.missing = -1
            self._fail(loop, failed, exc)
            return
        # Statistics first: a client that sees its answer must also see the batch that produced it.
        s = self.stats
        s.batches += 1
        s.items += len(batch)
        s.batch_sizes[len(batch)] += 1
        s.largest_batch = max(s.largest_batch, len(batch))
        rate = len(batch) / max(time.perf_counter() - started, 1e-6)
        s.items_per_s = rate if s.items_per_s == 0 else 0.9 * s.items_per_s + 0.1 * rate
        done: list[_Request] = []
        for it, out in zip(batch, outputs, strict=True):
            req = it.request
            req.results[it.position] = out
            req.missing -= 1
            if req.missing == 0:
                done.append(req)
        if done:  # one wake-up of the loop per batch, not per request
            loop.call_soon_threadsafe(_resolve_all, done)

    @staticmethod
    def _fail(loop: asyncio.AbstractEventLoop, requests: Sequence[_Request], exc: BaseException) -> None:
        log.warning("batch failed for %d request(s): %r", len(requests), exc)
        loop.call_soon_threadsafe(_reject_all, list(requests), exc)

    # ---- shutdown ----
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
        # Let a step already in the thread finish, then fail whatever its pool still holds.
        await asyncio.wrap_future(self._executor.submit(lambda: None))
        closed = BatcherClosed(f"model {self.name!r} is unloading")
        for it in self._pool:
            if not it.request.future.done():
                it.request.future.set_exception(closed)
        self._pool.clear()
        self._executor.shutdown(wait=False)


def _resolve_all(requests: list[_Request]) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_result([r for r in req.results if r is not None])


def _reject_all(requests: list[_Request], exc: BaseException) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_exception(exc)
