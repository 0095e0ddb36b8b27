"""The skeleton every scheduler worker shares (dynamic batcher, tensor batcher, generation engine): one
thread per model instance fed from the event loop through a thread-safe inbox, the work the loop side
holds open until it is answered, the bridge back to the loop, and supervision (``supervisor.py``):
a death fails what was held, the thread restarts with backoff, and too many deaths give up.

A subclass writes its thread's loop (``_work``), how one piece of held work is failed (``_abandon``)
and, where it keeps more state, what a reset clears besides (``_cleared``).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from llmosd.scheduler.errors import BatcherClosed
from llmosd.scheduler.supervisor import Supervisor, drain

if TYPE_CHECKING:
    from llmosd.hardware.autotune import BatchProfile
    from llmosd.scheduler.batcher import BatchPolicy

J = TypeVar("J")  # what the inbox carries to the thread (a request, a sequence)
H = TypeVar("H", bound=Hashable)  # what the loop side holds open until answered (a future, a stream)


def ewma(rate: float, sample: float, weight: float = 0.1) -> float:
    """An exponentially weighted rate (a worker's service rate, for Retry-After); the first sample as is."""
    return sample if rate == 0 else (1 - weight) * rate + weight * sample


class Worker(Generic[J, H]):
    kind: ClassVar[str] = "worker"  # its threads' name prefix: batch-, tensors-, generate-
    role: ClassVar[str] = "worker"  # what /api/status and the debug API call it: batcher, generation, tensors

    def __init__(self, name: str) -> None:
        self.name = name
        self._inbox: queue.SimpleQueue[J | None] = queue.SimpleQueue()  # None: stop
        self._open: set[H] = set()  # loop side: submitted, not answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.gave_up: Callable[[str], None] | None = None  # the pool's: unload and report the model
        self.supervisor = Supervisor(f"{self.kind}-{name}", self._work, self._reset, self._give_up)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.supervisor.start(self._loop)

    def unloading(self) -> BatcherClosed:
        return BatcherClosed(f"model {self.name!r} is unloading")

    def _admissible(self) -> asyncio.AbstractEventLoop:
        """On the loop, before taking work: refused at once while closing or while the thread is down."""
        if self._closed or self._loop is None:
            raise self.unloading()
        if not self.supervisor.healthy:
            raise self.supervisor.unavailable()
        return self._loop

    def _hold(self, pending: H, job: J) -> None:
        """Hold ``pending`` open until answered and hand ``job`` to the thread."""
        self._open.add(pending)
        self._inbox.put(job)

    async def close(self) -> None:
        """Refuse new work; the thread finishes its step, fails what is left, and exits."""
        self._closed = True
        self._inbox.put(None)
        await self.supervisor.join()
        self._reset(self.unloading())  # a worker that was down held these

    def _reset(self, exc: BaseException) -> None:
        """On the loop, with no thread running: fail everything submitted and not answered (what the
        thread held and what still queues), and let the next thread start from nothing."""
        drain(self._inbox)
        held = [p for p in list(self._open) if self._abandon(p, exc)]
        self._open.clear()
        self._cleared(exc, len(held))

    def _abandon(self, pending: H, exc: BaseException) -> bool:
        """Fail one piece of held work with ``exc``; False where it was answered already."""
        raise NotImplementedError

    def _cleared(self, exc: BaseException, failed: int) -> None:
        """What a reset clears besides the held work (``failed`` of it was failed now)."""

    def _give_up(self, reason: str) -> None:
        if self.gave_up is not None:
            self.gave_up(reason)

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        """From the thread: run ``fn(*args)`` on the loop (one wake-up)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- what a model instance asks of its worker (on the loop) ----
    def waiting(self) -> int:
        """Work accepted and not running yet (inputs, sequences or tensor requests)."""
        raise NotImplementedError

    def waiting_by_priority(self) -> dict[str, int]:
        return {}

    def outcomes(self) -> tuple[int, int]:
        """Requests answered and failed by the model (refused and cancelled ones are neither)."""
        return 0, 0

    def busy(self) -> bool:
        return self.waiting() > 0

    def in_flight(self) -> int:
        """Work held here that the instance does not count itself (routing adds it to its own count)."""
        return 0

    def apply(self, profile: BatchProfile, base: BatchPolicy | None = None) -> None:
        """Switch to tuned sizes (over ``base``, the configured policy, where given)."""

    def rebase(self, policy: BatchPolicy) -> None:
        """New configured limits, with no tuned sizes on top."""

    def report(self) -> dict[str, object]:
        """Its sizes and counters, for /api/status."""
        return {}

    def pace(self) -> tuple[int, float]:
        """Runs measured against a cost model, and how long they took of what it predicted."""
        return 0, 1.0

    # ---- worker thread ----
    def _work(self) -> None:
        """Run by the supervisor: whatever escapes kills the thread, which is then reset and restarted."""
        raise NotImplementedError


def abandon_future(future: asyncio.Future[Any], exc: BaseException) -> bool:
    if future.done():
        return False
    future.set_exception(exc)
    return True
