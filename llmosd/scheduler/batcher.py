"""Dynamic batching for one model (Triton's rules, Infinity's backend split, continuous formation).

Requests go from the event loop to one worker thread per model through a thread-safe inbox. The thread
keeps a pool of prepared (tokenised) items; at each step it admits what arrived meanwhile, runs one batch
(the oldest item plus the neighbours in length that make the run cheapest, see ``planning.choose_batch``)
and resolves every request whose last item is done, with one loop wake-up per batch. New requests thus
join between runs, and a long request never holds short ones behind it. An exception fails exactly the
requests it touched; a full queue is refused at once, on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import time
from collections import Counter
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from typing import Generic

from llmosd.hardware.autotune import BatchProfile, CostModel
from llmosd.runtime.backend import Backend, Input, Output, P
from llmosd.runtime.memory import IDLE_RELEASE_S, release_quietly
from llmosd.scheduler.errors import BatcherClosed, QueueFull
from llmosd.scheduler.histogram import SIZES, Histogram
from llmosd.scheduler.planning import RunCost, choose_batch, retry_after_s, token_cost
from llmosd.scheduler.priority import NORMAL, PRIORITIES, rank
from llmosd.scheduler.supervisor import WorkerDied
from llmosd.scheduler.worker import Worker, abandon_future, ewma

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_tokens: int = 8192
    run_cost_tokens: int = 48  # fixed cost of one session run, in tokens of work (see planning)
    max_delay_s: float = 0.0  # 0: batch whatever queued while the model was busy, add no latency
    max_queue: int = 1024  # items waiting (queued or prepared, not yet run)
    cost: CostModel | None = None  # measured by the autotune: replaces run_cost_tokens and max_tokens

    def run_cost(self) -> RunCost:
        return self.cost.run_ms if self.cost is not None else token_cost(self.run_cost_tokens)

    def token_cap(self) -> int:
        return self.cost.max_tokens if self.cost is not None else self.max_tokens


@dataclass
class BatchStats:
    requests: int = 0
    items: int = 0
    batches: int = 0
    failed_batches: int = 0
    completed: int = 0  # requests answered
    failed: int = 0  # requests the backend failed (not those refused or cancelled)
    rejected: int = 0
    largest_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    items_per_s: float = 0.0  # exponentially weighted service rate, for Retry-After
    queue_wait: Histogram = field(default_factory=Histogram)  # seconds from submit to the batch's start
    run_time: Histogram = field(default_factory=Histogram)  # seconds per backend.run
    sizes: Histogram = field(default_factory=lambda: Histogram(SIZES))
    # Measured run time / the cost model's prediction, exponentially weighted, over ``paced`` runs:
    # well under 1, the profile was measured on a slower (busier) box than this one now.
    pace: float = 1.0
    paced: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "items": self.items,
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "largest_batch": self.largest_batch,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "items_per_s": round(self.items_per_s, 1),
            "pace": round(self.pace, 3) if self.paced else None,
        }


@dataclass
class _Request:
    inputs: Sequence[Input]
    future: asyncio.Future[list[Output]]
    enqueued: float
    priority: int = NORMAL
    truncate: bool = True  # an input over the model's limit is cut there (else refused)
    results: list[Output | None] = field(default_factory=list)
    missing: int = 0  # items not yet run; -1 once failed (worker thread only)
    started: bool = False  # one of its items has run (worker thread only)


@dataclass
class _Item:
    request: _Request
    position: int
    prepared: Sized
    length: int
    order: int  # admission order: the oldest item has the lowest


class DynamicBatcher(Worker[_Request, asyncio.Future[list[Output]]], Generic[P]):
    kind, role = "batch", "batcher"

    def __init__(self, name: str, backend: Backend[P], policy: BatchPolicy | None = None) -> None:
        super().__init__(name)
        self.backend = backend
        self.policy = policy or BatchPolicy()
        self.stats = BatchStats()
        # Two counters, each written by one thread only, so neither needs a lock.
        self._submitted_items = [0, 0, 0]  # per priority class; event loop
        self._finished_items = [0, 0, 0]  # per class; worker thread: items taken to run, failed or dropped
        self._pool: list[_Item] = []  # worker thread only: prepared items
        self._ran_since_release = False  # worker thread only: the arena may hold a batch's peak
        self._backlog: list[_Request] = []  # worker thread only: arrived, not yet prepared
        self._order = itertools.count()

    @property
    def queued(self) -> int:
        """Items accepted and still waiting (queued or prepared, not yet running)."""
        return sum(self.queued_by_priority().values())

    def queued_by_priority(self) -> dict[str, int]:
        return {name: self._submitted_items[p] - self._finished_items[p] for p, name in enumerate(PRIORITIES)}

    async def submit(self, inputs: Sequence[Input], priority: int = NORMAL, truncate: bool = True) -> list[Output]:
        loop = self._admissible()
        queued = self.queued
        if queued and queued + len(inputs) > self.policy.max_queue:
            self.stats.rejected += 1
            raise QueueFull(self.name, retry_after_s(queued, self.stats.items_per_s))
        future: asyncio.Future[list[Output]] = loop.create_future()
        future.add_done_callback(self._open.discard)
        self._submitted_items[priority] += len(inputs)
        self.stats.requests += 1
        self._hold(future, _Request(inputs, future, time.monotonic(), priority, truncate))
        return await future

    def _abandon(self, pending: asyncio.Future[list[Output]], exc: BaseException) -> bool:
        return abandon_future(pending, exc)

    def waiting(self) -> int:
        return self.queued

    def waiting_by_priority(self) -> dict[str, int]:
        return self.queued_by_priority()

    def outcomes(self) -> tuple[int, int]:
        return self.stats.completed, self.stats.failed

    def apply(self, profile: BatchProfile, base: BatchPolicy | None = None) -> None:
        """Up to the largest size the profile's budget allows, priced by its cost model (the thread reads
        its policy at every step); a disturbed profile changes no size."""
        policy = base or self.policy
        if not profile.disturbed:
            policy = dataclasses.replace(policy, max_batch=max(profile.chosen, profile.largest), cost=profile.cost)
        self.policy = policy
        self.stats.pace, self.stats.paced = 1.0, 0

    def rebase(self, policy: BatchPolicy) -> None:
        self.policy = policy

    def report(self) -> dict[str, object]:
        return {"max_batch": self.policy.max_batch, "batcher": self.stats.as_dict()}

    def pace(self) -> tuple[int, float]:
        return self.stats.paced, self.stats.pace

    def _cleared(self, exc: BaseException, failed: int) -> None:
        if isinstance(exc, WorkerDied):  # the model's own worker failed them: probation counts these
            self.stats.failed += failed
        self._pool, self._backlog = [], []
        self._finished_items = list(self._submitted_items)

    # ---- worker thread ----
    def _work(self) -> None:
        """Run by the supervisor: whatever escapes from here (a bug anywhere, not a model error, which
        fails only its requests) kills the thread, and the supervisor fails, resets and restarts."""
        assert self._loop is not None
        loop = self._loop
        while True:
            arrived, running = self._collect()
            if not running:
                break
            self._step(loop, arrived)
        # Closing: whatever is not running yet is failed at once (the caller is unloading the model).
        left = _owners(self._pool) + arrived + self._backlog
        self._backlog = []
        while not self._inbox.empty():
            req = self._inbox.get_nowait()
            if req is not None:
                left.append(req)
        if left:
            self._fail(loop, left, self.unloading())

    def _collect(self) -> tuple[list[_Request], bool]:
        """The requests to prepare this step (blocking while there is nothing to do), and whether to go
        on (False once ``close`` has asked the thread to stop). Everything that arrived moves to the
        backlog; the best-ranked requests leave it for the pool, up to four batches' worth of items, so
        a high-priority request never waits behind a backlog of low ones."""
        go_on = True
        if not self._pool and not self._backlog:
            first = self._next_when_idle()
            if first is None:
                return [], False
            self._backlog.append(first)
            deadline = first.enqueued + self.policy.max_delay_s
            while (wait := deadline - time.monotonic()) > 0 and len(self._backlog) < self.policy.max_batch:
                try:
                    nxt = self._inbox.get(timeout=wait)
                except queue.Empty:
                    break
                if nxt is None:
                    return [], False
                self._backlog.append(nxt)
        while True:
            try:
                nxt = self._inbox.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                go_on = False
                break
            self._backlog.append(nxt)
        now = time.monotonic()
        self._backlog.sort(key=lambda r: (rank(r.priority, now - r.enqueued, 0), r.enqueued))
        room = 4 * self.policy.max_batch - len(self._pool)
        arrived: list[_Request] = []
        while self._backlog and (room > 0 or not (self._pool or arrived)):
            req = self._backlog.pop(0)
            arrived.append(req)
            room -= len(req.inputs)
        return arrived, go_on

    def _next_when_idle(self) -> _Request | None:
        """The next request, blocking; idle a moment after work, the backend gives its memory back first."""
        if self._ran_since_release:
            try:
                return self._inbox.get(timeout=IDLE_RELEASE_S)
            except queue.Empty:
                self._ran_since_release = False
                release_quietly(self.backend.release, self.name)
        return self._inbox.get()

    def _admit(self, loop: asyncio.AbstractEventLoop, requests: list[_Request]) -> None:
        for req in requests:
            if req.future.done():  # cancelled while queued: skip the work
                self._finished_items[req.priority] += len(req.inputs)
                continue
            try:  # a request whose inputs cannot be prepared fails alone
                items = self.backend.prepare(req.inputs, req.truncate)
            except Exception as exc:
                req.missing = -1
                self._finished_items[req.priority] += len(req.inputs)
                self._fail(loop, [req], exc)
                continue
            req.results = [None] * len(items)
            req.missing = len(items)
            order = next(self._order)
            self._pool.extend(_Item(req, k, x, len(x), order) for k, x in enumerate(items))

    def _step(self, loop: asyncio.AbstractEventLoop, arrived: list[_Request]) -> None:
        self._admit(loop, arrived)
        # Drop items whose request is already answered (failed, or cancelled by a departed client).
        kept = [it for it in self._pool if it.request.missing >= 0 and not it.request.future.done()]
        self._finish_items([it for it in self._pool if it.request.missing < 0 or it.request.future.done()])
        self._pool = kept
        if not kept:
            return
        kept.sort(key=lambda it: it.length)
        # The anchor: the best-ranked item (highest class, aged, then oldest); its neighbours in length join it.
        now = time.monotonic()
        anchor = min(range(len(kept)), key=lambda k: _rank(kept[k], now))
        p = self.policy
        i, j = choose_batch([it.length for it in kept], anchor, p.max_batch, p.token_cap(), p.run_cost())
        batch = kept[i:j]
        del kept[i:j]
        self._finish_items(batch)  # no longer waiting: the queue bound counts what waits
        self._run(loop, batch)

    def _finish_items(self, items: list[_Item]) -> None:
        for it in items:
            self._finished_items[it.request.priority] += 1

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        started = time.perf_counter()
        self._ran_since_release = True
        try:
            outputs = self.backend.run([it.prepared for it in batch])  # type: ignore[misc]
        except Exception as exc:
            self.stats.failed_batches += 1
            groups: dict[int, list[_Item]] = {}
            for it in batch:
                groups.setdefault(id(it.request), []).append(it)
            if len(groups) > 1:  # one request the model fails on must not fail its neighbours
                for items in groups.values():
                    self._run(loop, items)
                return
            failed = list({id(it.request): it.request for it in batch if it.request.missing >= 0}.values())
            for req in failed:
                req.missing = -1
            self.stats.failed += len(failed)
            self._fail(loop, failed, exc)
            return
        # Statistics first: a client that sees its answer must also see the batch that produced it.
        s = self.stats
        elapsed = time.perf_counter() - started
        s.run_time.observe(elapsed)
        s.sizes.observe(len(batch))
        now = time.monotonic()
        for req in {id(it.request): it.request for it in batch}.values():
            if not req.started:  # the wait ends when the request's first item runs
                req.started = True
                s.queue_wait.observe(now - elapsed - req.enqueued)
        s.batches += 1
        s.items += len(batch)
        s.batch_sizes[len(batch)] += 1
        s.largest_batch = max(s.largest_batch, len(batch))
        rate = len(batch) / max(elapsed, 1e-6)
        s.items_per_s = ewma(s.items_per_s, rate)
        cost = self.policy.cost
        if cost is not None:
            ratio = elapsed * 1000 / max(cost.run_ms(len(batch), max(it.length for it in batch)), 1e-6)
            s.pace = ratio if s.paced == 0 else 0.95 * s.pace + 0.05 * ratio
            s.paced += 1
        done: list[_Request] = []
        for it, out in zip(batch, outputs, strict=True):
            req = it.request
            req.results[it.position] = out
            req.missing -= 1
            if req.missing == 0:
                done.append(req)
        s.completed += len(done)
        self._deliver(loop, done)

    def _deliver(self, loop: asyncio.AbstractEventLoop, done: list[_Request]) -> None:
        if done:  # one wake-up of the loop per batch, not per request
            self._call(_resolve_all, done)

    def _fail(self, loop: asyncio.AbstractEventLoop, requests: Sequence[_Request], exc: BaseException) -> None:
        if not isinstance(exc, BatcherClosed):
            log.warning("batch failed for %d request(s): %r", len(requests), exc)
        self._call(_reject_all, list(requests), exc)


def _resolve_all(requests: list[_Request]) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_result([r for r in req.results if r is not None])


def _reject_all(requests: list[_Request], exc: BaseException) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_exception(exc)


def _rank(item: _Item, now: float) -> tuple[int, int]:
    return rank(item.request.priority, now - item.request.enqueued, item.order)


def _owners(items: list[_Item]) -> list[_Request]:
    return list({id(it.request): it.request for it in items}.values())
