"""Batching raw-tensor requests (/v2 infer) for one model: requests whose tensors agree on everything but
the first axis are stacked on it and run together, then the outputs are split back by rows.

One worker thread per model, started on the first /v2 request; the same rules as the text batcher:
bounded queue (429 at once), one loop wake-up per batch, a failure fails only its batch."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from llmosd.runtime.memory import IDLE_RELEASE_S, release_quietly, shrink_options, trim_heap
from llmosd.runtime.tensors import TensorModel
from llmosd.scheduler.errors import QueueFull
from llmosd.scheduler.histogram import SIZES, Histogram
from llmosd.scheduler.planning import retry_after_s
from llmosd.scheduler.worker import Worker, abandon_future, ewma

log = logging.getLogger(__name__)
Arrays = dict[str, npt.NDArray[Any]]


@dataclass
class TensorStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0  # requests in one run
    rejected: int = 0
    rows_per_s: float = 0.0
    sizes: Histogram = field(default_factory=lambda: Histogram(SIZES))
    run_time: Histogram = field(default_factory=Histogram)

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "rejected": self.rejected,
        }


@dataclass
class _Request:
    feeds: Arrays
    future: asyncio.Future[Arrays]

    @property
    def rows(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 1

    def signature(self) -> tuple[object, ...]:
        return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in self.feeds.items()))


class TensorBatcher(Worker[_Request, asyncio.Future[Arrays]]):
    kind = role = "tensors"

    def __init__(self, name: str, model: TensorModel, max_rows: int = 32, max_queue: int = 1024) -> None:
        super().__init__(name)
        self.model = model
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.stats = TensorStats()
        self._waiting = 0  # loop side
        self._last_row: Arrays | None = None  # worker thread only: set after a run, for the idle release

    async def submit(self, feeds: Mapping[str, npt.NDArray[Any]]) -> Arrays:
        loop = self._admissible()
        if self._waiting >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(self.name, retry_after_s(self._waiting, self.stats.rows_per_s))
        future: asyncio.Future[Arrays] = loop.create_future()
        future.add_done_callback(self._open.discard)
        self._waiting += 1
        self.stats.requests += 1
        self._hold(future, _Request(dict(feeds), future))
        try:
            return await future
        finally:
            self._waiting -= 1

    def _abandon(self, pending: asyncio.Future[Arrays], exc: BaseException) -> bool:
        return abandon_future(pending, exc)

    def waiting(self) -> int:
        return self._waiting

    def report(self) -> dict[str, object]:
        return {"tensors": self.stats.as_dict()}

    # ---- worker thread ----
    def _work(self) -> None:
        """Run by the supervisor: anything that escapes kills the thread, which is then restarted."""
        pending: list[_Request] = []
        while True:
            try:
                item = self._next(block=not pending)
                while item is not None:
                    pending.append(item)
                    item = self._inbox.get_nowait()
                self._settle(pending, self.unloading())
                return
            except queue.Empty:
                pass
            pending = [r for r in pending if not r.future.done()]
            if pending:
                batch, pending = self._take(pending)
                self._run(batch)

    def _next(self, block: bool) -> _Request | None:
        """The next arrival (queue.Empty when not blocking and none). Idle a moment after work, the
        session gives its spare arena memory back, on one row of a real request (no input to invent)."""
        if block and self._last_row is not None:
            try:
                return self._inbox.get(timeout=IDLE_RELEASE_S)
            except queue.Empty:
                feeds, self._last_row = self._last_row, None

                def release() -> None:  # on one row of a request that ran: no input to invent
                    self.model.run(feeds, shrink_options(self.model.session))
                    trim_heap()

                release_quietly(release, self.name)
        return self._inbox.get(block=block)

    def _take(self, pending: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """The oldest request and the later ones that stack with it, up to ``max_rows``."""
        first = pending[0]
        if not self.model.batchable:
            return [first], pending[1:]
        batch, rest, rows = [first], [], first.rows
        for r in pending[1:]:
            if r.signature() == first.signature() and rows + r.rows <= self.max_rows:
                batch.append(r)
                rows += r.rows
            else:
                rest.append(r)
        return batch, rest

    def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                results = [self.model.run(batch[0].feeds)]
            else:
                stacked = {k: np.concatenate([r.feeds[k] for r in batch]) for k in batch[0].feeds}
                out = self.model.run(stacked)
                bounds = np.cumsum([0, *(r.rows for r in batch)])
                results = [{k: v[bounds[i] : bounds[i + 1]] for k, v in out.items()} for i in range(len(batch))]
        except Exception as exc:
            if len(batch) > 1:  # one bad request (an id out of range...) must not fail its neighbours
                for r in batch:
                    self._run([r])
                return
            log.warning("tensor request failed for %s: %r", self.name, exc)
            self._settle(batch, exc)
            return
        elapsed = time.perf_counter() - started
        first = batch[0].feeds
        self._last_row = {k: v[:1] for k, v in first.items()} if self.model.batchable else first
        s = self.stats
        s.batches += 1
        s.largest_batch = max(s.largest_batch, len(batch))
        s.sizes.observe(len(batch))
        s.run_time.observe(elapsed)
        rate = sum(r.rows for r in batch) / max(elapsed, 1e-6)
        s.rows_per_s = ewma(s.rows_per_s, rate)
        self._deliver(batch, results)

    def _deliver(self, batch: list[_Request], results: list[Arrays]) -> None:
        self._call(_resolve, batch, results)

    def _settle(self, requests: list[_Request], exc: BaseException) -> None:
        if requests and self._loop is not None:
            self._call(_reject, requests, exc)


def _resolve(batch: list[_Request], results: list[Arrays]) -> None:
    for r, out in zip(batch, results, strict=True):
        if not r.future.done():
            r.future.set_result(out)


def _reject(requests: list[_Request], exc: BaseException) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(exc)
