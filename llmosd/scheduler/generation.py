"""Continuous batching for one causal LM: sequences join the running batch between decode steps and
leave as soon as they finish, so a long generation never holds a short one behind it.

One worker thread per model owns the cache and every sequence's state. Each step it admits waiting
sequences while the KV budget allows (each prompt is prefilled alone into a row of the model's cache,
which joins the batch at the next step), runs one decode step for every running row, samples,
detokenises, checks stops, and hands all the new text to the event loop in one wake-up. A request the
client abandoned is dropped at the next step. Admission reserves each sequence's worst case (prompt +
max_tokens positions) against the budget, so a batch can never outgrow it; what does not fit waits,
and a full wait queue answers 429 at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.grammar import BoolArray, Constraint
from llmosd.runtime.memory import IDLE_RELEASE_S, release_quietly
from llmosd.runtime.sampling import FloatArray, NonFiniteLogits, Sampler, SamplingParams, TokenLogprob, token_logprob
from llmosd.runtime.textstream import TextStream
from llmosd.scheduler.errors import QueueFull
from llmosd.scheduler.histogram import Histogram
from llmosd.scheduler.planning import retry_after_s
from llmosd.scheduler.priority import NORMAL, PRIORITIES, rank
from llmosd.scheduler.supervisor import WorkerDied
from llmosd.scheduler.worker import Worker, ewma

if TYPE_CHECKING:
    from llmosd.hardware.autotune import BatchProfile
    from llmosd.scheduler.batcher import BatchPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestTooLarge(ValueError):
    """The request can never run: it does not fit the context or the KV budget on its own."""


class GrammarFailed(ValueError):
    """A sequence's grammar failed midway (a limit of the grammar engine): that sequence ends, alone."""

    def __init__(self, reason: object) -> None:
        super().__init__(f"the grammar failed midway, so generation stopped: {reason}")


@dataclass(frozen=True)
class GenerationLimits:
    max_sequences: int = 16  # rows decoded together
    kv_cache_bytes: int = 1 << 30  # bound on the cache of the running rows (worst case reserved)
    max_queue: int = 256  # sequences waiting for a row
    prefill_tokens_per_step: int = 2048  # prompt tokens admitted between two decode steps (at least one prompt)
    prefix_cache_bytes: int = 128 << 20  # prompts' KV kept for reuse, at most (and within what rows leave)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = NORMAL
    logprobs: int | None = None  # None: none; n: each sampled token's log-probability and the n likeliest
    prompt_logprobs: bool = False  # and the prompt's own tokens' (completions' echo; max_tokens may be 0)


@dataclass(frozen=True)
class Chunk:
    """New text of one sequence; the last chunk carries why it ended (``stop`` or ``length``)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()  # sampled since the previous chunk (those of the text, and a stop id)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, where the request asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # on the first chunk, where asked: None for the first


class GenerationStream:
    """The event-loop side of one sequence: an async iterator of chunks; ``cancel`` frees its row."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
        self.cancelled = False  # read by the worker thread at its next step
        self._queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.on_done: Callable[[GenerationStream], None] | None = None  # the engine's: no longer open

    def _deliver(self, item: Chunk | BaseException) -> None:
        self._queue.put_nowait(item)
        if (isinstance(item, BaseException) or item.finish_reason is not None) and self.on_done is not None:
            self.on_done(self)

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_done is not None:
            self.on_done(self)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while self.finish_reason is None:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self.completion_tokens = item.completion_tokens
            self.finish_reason = item.finish_reason
            self.token_ids.extend(item.token_ids)
            self.logprobs.extend(item.logprobs)
            self.prompt_logprobs = self.prompt_logprobs or item.prompt_logprobs
            yield item

    async def text(self) -> str:
        """The whole completion (cancels the sequence if the caller is cancelled meanwhile)."""
        parts = []
        try:
            async for chunk in self:
                parts.append(chunk.text)
        finally:
            if self.finish_reason is None:
                self.cancel()
        return "".join(parts)


@dataclass
class _Sequence:
    request: GenerationRequest
    stream: GenerationStream
    sampler: Sampler
    text: TextStream
    reserve: int  # positions reserved: prompt + max_tokens (within the context)
    enqueued: float
    constraint: Constraint | None = None  # a grammar the tokens must follow (structured outputs, tools)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, where asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # until the first chunk takes them
    sent: int = 0  # tokens already handed out in chunks
    done: bool = False
    failed: bool = False  # its grammar failed: it ends with an error
    row: int = -1  # its row in the model's cache, once prefilled
    # Where its prompt's log-probabilities are asked: prompt positions fed so far. The fused graph gives the
    # last position's logits only, so the prompt is scored a position a decode step, beside the other rows
    # (one step is the longest it holds them; it leaves at the next step once cancelled).
    scored: int = 0
    entries: list[TokenLogprob | None] = field(default_factory=list)

    @property
    def scoring(self) -> bool:
        return 0 < self.scored < len(self.request.prompt_ids)

    def next_input(self) -> int:
        """The token this row feeds the next step: its prompt's next one while scored, else its last."""
        return self.request.prompt_ids[self.scored] if self.scoring else self.tokens[-1]

    def wants_mask(self) -> bool:
        """A grammar's mask is needed for a step whose logits will be sampled."""
        last = len(self.request.prompt_ids) - 1
        return self.constraint is not None and (not self.scoring or self.scored == last)

    def score(self, logits: FloatArray) -> bool:
        """Take the logits of the position just fed (the first, at prefill, with ``scored`` 0); True once
        the whole prompt is in and ``logits`` are the next token's."""
        ids, top = self.request.prompt_ids, self.request.logprobs or 0
        if self.scored == 0:
            self.entries = [None]  # the first token has no context to be scored in
        self.scored += 1
        if self.scored < len(ids):
            self.entries.append(token_logprob(logits, ids[self.scored], top))
            return False
        self.prompt_logprobs, self.entries = tuple(self.entries), []
        return True

    def advance(self, logits: FloatArray, eos: frozenset[int], allowed: BoolArray | None = None) -> Chunk | None:
        """Sample from this row's logits (among the tokens its grammar allows) and take the token; return
        the chunk to deliver, None while there is nothing to say."""
        token = self.sampler.pick(logits, allowed)
        if self.request.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.request.logprobs))
        chunk = self._advance(token, eos)
        if not chunk.text and chunk.finish_reason is None:
            return None
        ids, lps = tuple(self.tokens[self.sent :]), tuple(self.logprobs[self.sent :])
        self.sent = len(self.tokens)
        prompt, self.prompt_logprobs = self.prompt_logprobs, ()
        return Chunk(chunk.text, chunk.completion_tokens, chunk.finish_reason, ids, lps, prompt)

    def _advance(self, token: int, eos: frozenset[int]) -> Chunk:
        req = self.request
        self.tokens.append(token)
        n = len(self.tokens)
        # A grammar allows the end of sequence only once it is complete: then it ends, ignore_eos or not.
        if (token in eos and (not req.ignore_eos or self.constraint)) or token in req.stop_token_ids:
            self.done = True
            return Chunk(self.text.finish(), n, "stop")
        if self.constraint is not None:
            self.constraint.consume(token)
        self.sampler.observe(token)
        text = self.text.push(token)
        if self.text.stopped or (self.constraint is not None and self.constraint.finished):
            self.done = True  # a complete grammar takes nothing but the end of sequence: end now
            return Chunk(text + self.text.finish(), n, "stop")
        if n >= req.max_tokens or len(req.prompt_ids) + n >= self.reserve:
            self.done = True
            return Chunk(text + self.text.finish(), n, "length")
        return Chunk(text, n)


@dataclass
class GenerationStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    running: int = 0
    waiting: int = 0
    waiting_by_priority: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    largest_batch: int = 0
    kv_reserved_bytes: int = 0
    tokens_per_s: float = 0.0  # exponentially weighted decode rate, for Retry-After
    generated_tokens: int = 0  # every sampled token, the first ones (from prefill) included
    constrained_tokens: int = 0  # of those, sampled under a grammar
    grammar_compiles: int = 0  # grammars compiled (a schema seen before is copied, not compiled)
    prefix_queries: int = 0  # prompts looked up in the prefix cache
    prefix_hits: int = 0  # of those, prompts that reused cached blocks
    prefix_hit_tokens: int = 0  # prompt positions copied from the cache instead of prefilled
    prefix_cache_bytes: int = 0  # what the cache holds now
    queue_wait: Histogram = field(default_factory=Histogram)  # seconds from submit to prefill
    step_time: Histogram = field(default_factory=Histogram)  # seconds per decode step
    prefill_time: Histogram = field(default_factory=Histogram)  # seconds per prompt

    def as_dict(self) -> dict[str, object]:
        return {
            k: round(v, 1) if isinstance(v, float) else v
            for k, v in self.__dict__.items()
            if not isinstance(v, Histogram)
        }


class GenerationEngine(Worker[_Sequence, GenerationStream]):
    kind, role = "generate", "generation"

    def __init__(self, name: str, model: TextGenerator, limits: GenerationLimits) -> None:
        super().__init__(name)
        self.model = model
        self.limits = limits
        self.stats = GenerationStats()
        self._waiting_count = 0  # loop-side count of sequences not yet running, for admission
        self._ran_since_release = False  # worker thread only
        self._masker: ThreadPoolExecutor | None = None  # grammar masks, computed while the model runs

    def submit(self, request: GenerationRequest, constraint: Constraint | None = None) -> GenerationStream:
        """Queue one sequence (on the loop), with its own grammar matcher where its output is constrained.
        Raises RequestTooLarge, QueueFull or BatcherClosed at once."""
        self._admissible()
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestTooLarge("the prompt is empty after tokenisation")
        if n >= self.model.context_length:
            raise RequestTooLarge(
                f"the prompt has {n} tokens; model {self.name!r} has a context of {self.model.context_length}"
            )
        if n + request.max_tokens > self.model.context_length:
            raise RequestTooLarge(
                f"the prompt has {n} tokens and max_tokens is {request.max_tokens}: together more than the "
                f"context of {self.model.context_length} tokens of model {self.name!r}"
            )
        reserve = n + request.max_tokens
        need = reserve * self.model.lm.bytes_per_token
        if need > self.limits.kv_cache_bytes:
            raise RequestTooLarge(
                f"the request needs {need >> 20} MiB of KV cache ({reserve} positions); the limit is "
                f"{self.limits.kv_cache_bytes >> 20} MiB: shorten the prompt or max_tokens"
            )
        if self._waiting_count >= self.limits.max_queue:
            self.stats.rejected += 1
            raise QueueFull(self.name, retry_after_s(self._waiting_count, self._sequences_per_s()))
        stream = GenerationStream(n)
        sampler = Sampler(request.sampling, self.model.lm.vocab_size, list(request.prompt_ids))
        text = TextStream(self.model.tokenizer, request.stop)
        seq = _Sequence(request, stream, sampler, text, reserve, time.time(), constraint)
        self._waiting_count += 1
        self.stats.requests += 1
        stream.on_done = self._open.discard
        self._hold(stream, seq)
        return stream

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Token ids as text; ``special``: with the special tokens written out (a logprob's token)."""
        return str(self.model.tokenizer.decode(ids, skip_special_tokens=not special))

    def stop_ids(self, stop_token_ids: frozenset[int], ignore_eos: bool) -> frozenset[int]:
        """The ids a sequence of such a request stops on without showing them."""
        return stop_token_ids | (frozenset() if ignore_eos else self.model.eos_token_ids)

    @property
    def load(self) -> int:
        """Sequences accepted and not finished yet: what routing across a model's instances compares."""
        s = self.stats
        return s.requests - s.completed - s.cancelled - s.failed

    def _sequences_per_s(self) -> float:
        st = self.stats
        mean_tokens = st.decode_tokens / st.completed if st.completed else 0.0
        return st.tokens_per_s / mean_tokens if mean_tokens else 0.0

    async def close(self) -> None:
        """Stop admitting, fail what is still waiting or running, join the worker."""
        await super().close()
        if self._masker is not None:
            self._masker.shutdown(wait=False)

    def waiting(self) -> int:
        return self.stats.waiting

    def waiting_by_priority(self) -> dict[str, int]:
        return dict(self.stats.waiting_by_priority)

    def outcomes(self) -> tuple[int, int]:
        return self.stats.completed, self.stats.failed

    def busy(self) -> bool:
        return self.stats.running + self.stats.waiting > 0

    def in_flight(self) -> int:
        return self.load

    def apply(self, profile: BatchProfile, base: BatchPolicy | None = None) -> None:
        """Rows decoded together (the thread reads its limits at every step)."""
        if not profile.disturbed:
            self.limits = dataclasses.replace(self.limits, max_sequences=profile.chosen)

    def report(self) -> dict[str, object]:
        return {"max_sequences": self.limits.max_sequences, "generation": self.stats.as_dict()}

    def _abandon(self, pending: GenerationStream, exc: BaseException) -> bool:
        pending._deliver(exc)
        return True

    def _cleared(self, exc: BaseException, failed: int) -> None:
        """The next thread starts from nothing (its cache and rows were the dead thread's locals)."""
        self._waiting_count = 0
        st = self.stats
        if isinstance(exc, WorkerDied):  # the model's own worker failed them: probation counts these
            st.failed += failed
        st.running = st.waiting = st.kv_reserved_bytes = 0
        st.waiting_by_priority = dict.fromkeys(PRIORITIES, 0)
        st.cancelled = st.requests - st.completed - st.failed  # the rest left unseen: ``load`` is 0 again

    # --- worker thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        """Run by the supervisor. A step that fails (a runtime fault) fails its rows and the engine goes
        on; whatever escapes from elsewhere kills the thread, and the supervisor fails, resets, restarts."""
        lm = self.model.lm
        lm.reset()  # a restarted worker starts from nothing: the dead one's rows were its locals
        waiting: deque[_Sequence] = deque()
        rows: list[_Sequence] = []
        self._publish_counts(waiting, rows)  # the warm-up's prefills are counted before any request
        while True:
            if not self._take(waiting, block=not rows and not waiting):
                self._fail([*waiting, *rows], self.unloading())
                return
            joining: list[_Sequence] = []
            self._ran_since_release = self._ran_since_release or bool(rows or waiting)
            try:
                self._admit(waiting, rows, joining)
                rows.extend(joining)
                joining = []
                if rows:
                    self._step(rows)
                self._count_leavers([s for s in rows if s.stream.cancelled and not s.done])  # done: in _step
                for s in rows:
                    if s.done or s.stream.cancelled:
                        lm.free(s.row)  # its slot is the next joiner's
                rows = [s for s in rows if not (s.done or s.stream.cancelled)]
            except Exception as exc:  # a runtime fault: fail the batch (and who was joining it), keep serving
                log.exception("generation step failed for %s", self.name)
                failed = [*rows, *joining]
                self.stats.failed += len(failed)
                self._fail(failed, RuntimeError(f"generation failed: {exc}"))
                rows = []
                lm.reset()
            self._publish_counts(waiting, rows)

    def _take(self, waiting: deque[_Sequence], block: bool) -> bool:
        """Move arrivals into ``waiting``; False once close() was called. Idle a moment after work, the
        session gives its spare arena memory back before the worker blocks."""
        try:
            if block and self._ran_since_release:
                try:
                    item = self._inbox.get(timeout=IDLE_RELEASE_S)
                except queue.Empty:
                    self._ran_since_release = False
                    release_quietly(self.model.lm.release, self.name)
                    item = self._inbox.get()
            else:
                item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _admit(self, waiting: deque[_Sequence], rows: list[_Sequence], joining: list[_Sequence]) -> None:
        """Prefill what fits into ``joining`` (the caller's list, so a fault midway loses none of them)."""
        now = time.time()
        ordered = sorted(waiting, key=lambda s: (rank(s.request.priority, now - s.enqueued, 0), s.enqueued))
        waiting.clear()
        waiting.extend(ordered)
        budget = self.limits.prefill_tokens_per_step
        while waiting:
            seq = waiting[0]
            if seq.stream.cancelled:
                waiting.popleft()
                self._left_queue(1)
                self.stats.cancelled += 1
                continue
            running = [*rows, *joining]
            if not self._fits(seq, running) or (joining and budget < len(seq.request.prompt_ids)):
                break
            waiting.popleft()
            self._left_queue(1)
            budget -= len(seq.request.prompt_ids)
            self.stats.queue_wait.observe(time.time() - seq.enqueued)
            try:
                started = time.perf_counter()
                (logits, seq.row), masks = self._while_masking([seq], partial(self._prefill, seq))
                self.stats.prefill_time.observe(time.perf_counter() - started)
                if seq.scoring:  # the rest of its prompt is scored beside the other rows, a position a step
                    self.stats.prefill_tokens += 1
                    joining.append(seq)
                    continue
                if seq.request.max_tokens == 0:  # the prompt scored, nothing to generate
                    seq.done = True
                    chunk: Chunk | None = Chunk("", 0, "length", prompt_logprobs=seq.prompt_logprobs)
                else:
                    self.stats.generated_tokens += 1
                    chunk = seq.advance(logits, self.model.eos_token_ids, masks[0])
            except Exception as exc:
                if seq.row >= 0:
                    self.model.lm.free(seq.row)
                self.stats.failed += 1
                if isinstance(exc, ValueError) and (why := self._row_failure(exc, seq)) is not None:
                    log.warning("a sequence of %s failed: %s", self.name, why)
                    self._fail([seq], why)
                else:
                    log.exception("prefill failed for %s", self.name)
                    self._fail([seq], RuntimeError(f"generation failed: {exc}"))
                continue
            self.stats.prefill_tokens += len(seq.request.prompt_ids)
            if seq.done:  # counted before its last chunk goes out, as in _step
                self._count_leavers([seq])
            if chunk is not None:
                self._deliver([(seq, chunk)])  # the first token goes out before the next decode step
            if seq.done:
                self.model.lm.free(seq.row)
            else:
                joining.append(seq)

    def _prefill(self, seq: _Sequence) -> tuple[FloatArray, int]:
        """Prefill a row; where its prompt's log-probabilities are asked, only its first token (the rest is
        scored a position a step, in ``_step``)."""
        req = seq.request
        if not (req.prompt_logprobs and req.logprobs is not None):
            return self.model.lm.prefill(req.prompt_ids)
        logits, row = self.model.lm.prefill(req.prompt_ids[:1])
        seq.score(logits)
        return logits, row

    def _row_failure(self, exc: ValueError, seq: _Sequence) -> ValueError | None:
        """What one row's sampling error means for that row alone: its grammar failed (and is dropped from
        the cache: its copies share the failed lexer), or its logits were not finite. None: anything else,
        the engine's fault, which fails the batch."""
        if isinstance(exc, NonFiniteLogits):
            return exc
        if seq.constraint is None:
            return None
        self.model.grammars.forget(seq.constraint.key)
        return GrammarFailed(exc)

    def _fits(self, seq: _Sequence, running: list[_Sequence]) -> bool:
        if len(running) >= min(self.limits.max_sequences, self.model.lm.capacity):
            return False
        reserves = [*(s.reserve for s in running), seq.reserve]
        need = self.model.lm.reserved_bytes(reserves)
        if need > self.limits.kv_cache_bytes:
            return False
        self._prefix_room(need)
        return True

    def _prefix_room(self, reserved: int) -> None:
        """The prefix cache holds what the rows' reservations leave of the KV budget: admitting a row
        evicts its least recently used blocks first."""
        cache = self.model.lm.prefix
        if cache is not None:
            cache.limit = min(self.limits.prefix_cache_bytes, self.limits.kv_cache_bytes - reserved)
            cache.shrink(cache.limit)

    def _while_masking(self, rows: list[_Sequence], run: Callable[[], T]) -> tuple[T, list[BoolArray | None]]:
        """``run()`` (the model's step), with the grammar masks of the constrained rows computed meanwhile
        on another thread (llguidance and ONNX Runtime both let go of the GIL): an unconstrained batch
        waits for nothing, a constrained one mostly not for its masks."""
        constrained = [i for i, s in enumerate(rows) if s.wants_mask()]
        if not constrained:
            return run(), [None] * len(rows)
        self.stats.constrained_tokens += len(constrained)
        if self._masker is None:
            self._masker = ThreadPoolExecutor(1, thread_name_prefix=f"grammar-{self.name}")
        grammars, vocab = self.model.grammars, self.model.lm.vocab_size
        matchers = [c for i in constrained if (c := rows[i].constraint) is not None]
        future: Future[BoolArray] = self._masker.submit(grammars.fill_masks, matchers, vocab)
        try:
            out = run()
        finally:
            allowed = future.result()
        masks: list[BoolArray | None] = [None] * len(rows)
        for j, i in enumerate(constrained):
            masks[i] = allowed[j]
        return out, masks

    def _step(self, rows: list[_Sequence]) -> None:
        started = time.perf_counter()
        lm = self.model.lm
        step = partial(lm.decode, [s.row for s in rows], [s.next_input() for s in rows])
        logits, masks = self._while_masking(rows, step)
        eos = self.model.eos_token_ids
        chunks: list[tuple[_Sequence, Chunk | None]] = []
        broken: list[tuple[_Sequence, ValueError]] = []
        scored = sampled = 0  # rows that fed a prompt position, rows that sampled a token
        for i, s in enumerate(rows):
            try:
                if s.scoring:
                    scored += 1
                    if not s.score(logits[i]):
                        continue
                    if s.request.max_tokens == 0:  # the prompt scored, nothing to generate
                        s.done = True
                        chunks.append((s, Chunk("", 0, "length", prompt_logprobs=s.prompt_logprobs)))
                        continue
                sampled += 1
                chunks.append((s, s.advance(logits[i], eos, masks[i])))
            except ValueError as exc:  # a client's grammar hit a limit, or the row's logits broke: only it fails
                if (why := self._row_failure(exc, s)) is None:
                    raise
                log.warning("a sequence of %s failed: %s", self.name, why)
                s.done = s.failed = True
                broken.append((s, why))
        # Counters before delivery: a client that has its tokens must find them counted (a scrape right
        # after a response read one token short when this ran after the hand-off).
        elapsed = time.perf_counter() - started
        st = self.stats
        st.step_time.observe(elapsed)
        st.steps += 1
        st.decode_tokens += len(rows) - scored
        st.prefill_tokens += scored
        st.generated_tokens += sampled
        st.largest_batch = max(st.largest_batch, len(rows))
        rate = len(rows) / max(elapsed, 1e-6)
        st.tokens_per_s = ewma(st.tokens_per_s, rate)
        self._count_leavers([s for s, _ in chunks if s.done] + [s for s, _ in broken])
        self._deliver([(s, c) for s, c in chunks if c is not None])
        for s, why in broken:
            self._fail([s], why)

    def _count_leavers(self, leaving: list[_Sequence]) -> None:
        for s in leaving:
            if s.failed:
                self.stats.failed += 1
            elif s.done:
                self.stats.completed += 1
            else:
                self.stats.cancelled += 1

    def _publish_counts(self, waiting: deque[_Sequence], rows: list[_Sequence]) -> None:
        self.stats.running = len(rows)
        self.stats.waiting = len(waiting)
        counts = [0, 0, 0]
        for s in waiting:
            counts[s.request.priority] += 1
        self.stats.waiting_by_priority = dict(zip(PRIORITIES, counts, strict=True))
        self.stats.kv_reserved_bytes = self.model.lm.reserved_bytes([s.reserve for s in rows])
        self.stats.grammar_compiles = self.model.grammars.compiles
        cache = self.model.lm.prefix
        if cache is not None:
            self._prefix_room(self.stats.kv_reserved_bytes)
            st = self.stats
            st.prefix_queries, st.prefix_hits = cache.stats.queries, cache.stats.hits
            st.prefix_hit_tokens, st.prefix_cache_bytes = cache.stats.hit_tokens, cache.bytes

    def _left_queue(self, n: int) -> None:
        self._call(lambda: setattr(self, "_waiting_count", self._waiting_count - n))

    def _deliver(self, items: list[tuple[_Sequence, Chunk]]) -> None:
        if items:

            def deliver() -> None:
                for s, c in items:
                    s.stream._deliver(c)

            self._call(deliver)

    def _fail(self, seqs: list[_Sequence], exc: BaseException) -> None:
        if seqs:

            def fail() -> None:
                for s in seqs:
                    s.stream._deliver(exc)

            self._call(fail)
