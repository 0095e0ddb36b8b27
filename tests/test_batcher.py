"""The dynamic batcher's own rules, with a small in-process backend that honours the backend contract."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from llmosd.runtime import Output
from llmosd.scheduler import BatcherClosed, BatchPolicy, DynamicBatcher, QueueFull
from llmosd.scheduler.planning import choose_batch, retry_after_s, token_cost


class Words:
    """A text's word count is its 'token' count; the result encodes the text's length."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __len__(self) -> int:
        return len(self.text.split())


class WordBackend:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = gate
        self.entered = threading.Event()  # run() was called: the worker is busy

    def prepare(self, inputs: Sequence[str], truncate: bool = True) -> list[Words]:
        if any(t == "bad-prepare" for t in inputs):
            raise ValueError("cannot prepare")
        return [Words(t) for t in inputs]

    def run(self, batch: Sequence[Words]) -> list[Output]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append([w.text for w in batch])
        if any("boom" in w.text for w in batch):
            raise RuntimeError("boom")
        return [Output(np.array([len(w.text)], dtype=np.float32), len(w)) for w in batch]

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        pass


def test_choose_batch_keeps_the_oldest_and_groups_similar_lengths() -> None:
    lengths = [5, 5, 6, 29, 30, 31, 60]  # sorted, as the pool keeps them
    assert choose_batch(lengths, 4, max_batch=8, max_tokens=1000, cost=token_cost(16)) == (3, 6)
    assert choose_batch(lengths, 0, max_batch=8, max_tokens=1000, cost=token_cost(16)) == (0, 3)
    assert choose_batch(lengths, 6, max_batch=8, max_tokens=1000, cost=token_cost(16)) == (6, 7)
    # A huge fixed cost per run favours one full batch; the batch and token limits still hold.
    assert choose_batch([10] * 8, 0, max_batch=4, max_tokens=1000, cost=token_cost(1000)) == (0, 4)
    i, j = choose_batch([10] * 10, 5, max_batch=8, max_tokens=25, cost=token_cost(1000))
    assert i <= 5 < j and (j - i) * 10 <= 25
    assert choose_batch([500], 0, max_batch=8, max_tokens=25, cost=token_cost(16)) == (0, 1)  # a lone item fits
    with pytest.raises(ValueError):
        choose_batch([1, 2], 2, max_batch=8, max_tokens=25, cost=token_cost(16))


def test_retry_after_follows_service_rate() -> None:
    assert retry_after_s(100, 50.0) == 2
    assert retry_after_s(1, 1000.0) == 1
    assert retry_after_s(10, 0.0) == 1


async def test_concurrent_requests_are_merged_and_split_back() -> None:
    gate = threading.Event()
    backend = WordBackend(gate)
    b = DynamicBatcher("t", backend, BatchPolicy(max_batch=64))
    b.start()
    try:
        first = asyncio.create_task(b.submit(["hold the worker"]))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker is busy inside run(): the rest queue up
        texts = [" ".join(["w"] * (i % 5 + 1)) + f" {i}" for i in range(20)]
        rest = [asyncio.create_task(b.submit([t, t + " x"])) for t in texts]
        gate.set()
        results = await asyncio.gather(first, *rest)
        for t, res in zip(texts, results[1:], strict=True):
            assert [o.values[0] for o in res] == [len(t), len(t) + 2]  # each request gets its own results
        assert b.stats.largest_batch > 2
        assert b.stats.requests == 21 and b.stats.items == 41
        for batch in backend.batches:  # inside a batch, lengths are sorted
            assert [len(x.split()) for x in batch] == sorted(len(x.split()) for x in batch)
    finally:
        await b.close()


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    gate = threading.Event()
    backend = WordBackend(gate)
    b = DynamicBatcher("t", backend, BatchPolicy(max_batch=64, run_cost_tokens=0))
    b.start()
    try:
        hold = asyncio.create_task(b.submit(["hold"]))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker is busy with it
        good = asyncio.create_task(b.submit(["one two three"]))
        bad = asyncio.create_task(b.submit(["boom"]))
        neighbour = asyncio.create_task(b.submit(["one", "two"]))  # the same length as "boom": batched with it
        bad_prep = asyncio.create_task(b.submit(["bad-prepare"]))
        gate.set()
        assert (await hold)[0].tokens == 1
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        with pytest.raises(ValueError, match="cannot prepare"):
            await bad_prep
        assert (await good)[0].tokens == 3  # same window, other batch: unaffected
        assert [o.values[0] for o in await neighbour] == [3, 3]  # its batch failed; run again alone, it passed
        assert ["boom", "one", "two"] in [sorted(x) for x in backend.batches]
        assert (b.stats.completed, b.stats.failed, b.stats.failed_batches) == (3, 1, 2)
        assert (await b.submit(["still serving"]))[0].tokens == 2
    finally:
        await b.close()


async def test_full_queue_is_refused_at_once() -> None:
    gate = threading.Event()
    backend = WordBackend(gate)
    b = DynamicBatcher("t", backend, BatchPolicy(max_batch=4, max_queue=8))
    b.start()
    try:
        hold = asyncio.create_task(b.submit(["hold"]))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker is busy with it
        queued = [asyncio.create_task(b.submit(["a", "b", "c", "d"])) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await b.submit(["one too many"])
        assert info.value.retry_after >= 1 and b.stats.rejected == 1
        gate.set()
        await asyncio.gather(hold, *queued)
    finally:
        await b.close()


async def test_cancelled_requests_are_skipped() -> None:
    gate = threading.Event()
    backend = WordBackend(gate)
    b = DynamicBatcher("t", backend, BatchPolicy(max_batch=64))
    b.start()
    try:
        hold = asyncio.create_task(b.submit(["hold"]))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker is busy with it
        gone = asyncio.create_task(b.submit(["client went away"]))
        await asyncio.sleep(0)
        gone.cancel()
        kept = asyncio.create_task(b.submit(["kept"]))
        gate.set()
        await asyncio.gather(hold, kept)
        assert all("client went away" not in batch for batch in backend.batches)
    finally:
        await b.close()


async def test_close_fails_waiting_requests_and_stops_the_thread() -> None:
    gate = threading.Event()
    backend = WordBackend(gate)
    b = DynamicBatcher("t", backend, BatchPolicy())
    b.start()
    hold = asyncio.create_task(b.submit(["hold"]))
    assert await asyncio.to_thread(backend.entered.wait, 10)
    waiting = asyncio.create_task(b.submit(["waiting"]))
    await asyncio.sleep(0)
    closing = asyncio.create_task(b.close())
    await asyncio.sleep(0.05)
    gate.set()
    await closing
    assert (await hold)[0].tokens == 1  # the running batch finishes
    with pytest.raises(BatcherClosed):
        await waiting
    with pytest.raises(BatcherClosed):
        await b.submit(["too late"])
    assert not any(t.name == "batch-t" for t in threading.enumerate())


async def test_a_high_request_queued_behind_100_low_ones_runs_in_the_next_batch() -> None:
    from llmosd.scheduler.priority import HIGH, LOW

    gate = threading.Event()
    backend = WordBackend(gate)
    b = DynamicBatcher("t", backend, BatchPolicy(max_batch=4, run_cost_tokens=0))
    b.start()
    try:
        hold = asyncio.create_task(b.submit(["hold"]))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker is inside run(), behind the gate
        lows = [asyncio.create_task(b.submit([f"low {i}"], LOW)) for i in range(100)]
        await asyncio.sleep(0)
        high = asyncio.create_task(b.submit(["high one"], HIGH))
        await asyncio.sleep(0.05)
        assert b.queued_by_priority() == {"high": 1, "normal": 0, "low": 100}
        gate.set()
        await asyncio.gather(hold, high, *lows)
        assert backend.batches[0] == ["hold"] and "high one" in backend.batches[1]
        assert b.queued_by_priority() == {"high": 0, "normal": 0, "low": 0}
    finally:
        await b.close()


def test_waiting_raises_a_request_so_low_never_starves() -> None:
    from llmosd.scheduler.priority import AGING_S, HIGH, LOW, NORMAL, parse_priority, rank

    assert rank(HIGH, 0.0, 5) < rank(NORMAL, 0.0, 1) < rank(LOW, 0.0, 0)
    assert rank(LOW, 2 * AGING_S + 0.1, 0) < rank(HIGH, 0.0, 1)  # an old low request overtakes fresh highs
    assert parse_priority("HIGH") == HIGH and parse_priority(" low") == LOW
    with pytest.raises(ValueError, match="high, normal, low"):
        parse_priority("urgent")


async def test_runs_faster_than_the_profile_predicts_ask_for_a_retune() -> None:
    """A profile measured on a busy box predicts 50 ms a run; these runs take microseconds. After
    PACED_RUNS runs the pace (measured / predicted) is far under FAST_PACE and the instance says why it
    wants measuring again; a disturbed profile asks at once and changes no size."""
    from typing import Any, cast

    from llmosd.hardware.autotune import BatchProfile, CostModel
    from llmosd.scheduler.served import FAST_PACE, PACED_RUNS, Instance

    slow = CostModel(fixed_ms=50.0, token_ms=0.1, token_sq_ms=0.0, max_tokens=512)
    profile = BatchProfile("t:1", "sha256:x", "cpu", "cpu|x|2 cores|ort", 16, 250.0, 64, (), 8, "batch 8", cost=slow)
    b = DynamicBatcher("t", WordBackend(), BatchPolicy(max_batch=64))
    instance = Instance(loaded=cast(Any, None), worker=b)
    instance.apply(profile)
    assert b.policy.cost == slow and b.policy.max_batch == 8 and instance.retune_reason() is None
    b.start()
    try:
        for i in range(PACED_RUNS):
            await b.submit([f"run {i}"])
    finally:
        await b.close()
    assert b.stats.paced == PACED_RUNS and b.stats.pace < FAST_PACE
    why = instance.retune_reason()
    assert why is not None and "of the time its profile predicts" in why
    instance.pace_retunes = 2  # bounded: a cost model that is simply off cannot keep the tuner running
    assert instance.retune_reason() is None
    busy = dataclasses.replace(profile, disturbed=True, reason="not trusted: ...", chosen=2, cost=None)
    instance.apply(busy)
    assert b.policy.max_batch == 8 and b.policy.cost == slow  # the sizes stay
    assert instance.retune_reason() == "its last calibration was disturbed"
