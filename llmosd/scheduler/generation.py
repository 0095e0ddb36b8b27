"""Continuous batching for one causal LM: sequences join the running batch between decode steps and
leave as soon as they finish, so a long generation never holds a short one behind it.

One worker thread per model owns the cache and every sequence's state. Each step it admits waiting
sequences while the KV budget allows (each gets a row of the model's cache), runs one decode step for
every row whose prompt is in, samples, detokenises, checks stops, then runs prompt chunks up to
``prefill_chunk_tokens`` positions (a prompt whose last chunk ran samples its first token and decodes
from the next step on), and hands all the new text to the event loop in one wake-up. No request holds
the others for longer than one decode step plus one chunk, whatever its prompt's length; a scored
prompt (echo + logprobs) runs the same way, every position's logits from its chunks. A request the
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
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from tokenizers import Tokenizer

from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.grammar import BoolArray, Constraint
from llmosd.runtime.memory import IDLE_RELEASE_S, release_quietly
from llmosd.runtime.reasoning import ThinkingPlan, Tracker
from llmosd.runtime.sampling import FloatArray, NonFiniteLogits, Sampler, SamplingParams, TokenLogprob, token_logprob
from llmosd.runtime.textstream import TextStream
from llmosd.runtime.tools import ToolCall, written
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
# Prompt positions scored a run at most. Each keeps its logits (64 x SmolLM2's 49k: 12.6 MB) and its
# log-softmax (0.3 ms a position): a chunk of 64 is about as long as a prefill chunk of 128 (SmolLM2,
# AVX-512: 0.14-0.2 s; 2.6 ms a position scored, where 128 took 2.4 and 32 took 3.1).
SCORED_CHUNK = 64


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
    # Prompt positions run between two decode steps (at least one chunk): a longer prompt runs in chunks of
    # this size, so no prompt holds the running rows for more than one chunk's time.
    prefill_chunk_tokens: int = 128
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
    thinking: ThinkingPlan | None = None  # a chat on a model that thinks: its output is split


@dataclass(frozen=True)
class Chunk:
    """New text of one sequence; the last chunk carries why it ended (``stop`` or ``length``)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()  # sampled since the previous chunk (those of the text, and a stop id)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, where the request asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # on the first chunk, where asked: None for the first
    reasoning: str = ""  # new thinking text (a model that thinks before it answers; ``text`` is the answer)
    reasoning_tokens: int = 0  # thinking tokens so far (counted in completion_tokens too)


class GenerationStream:
    """The event-loop side of one sequence: an async iterator of chunks; ``cancel`` frees its row."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
        self.reasoning: list[str] = []  # the thinking, as it came
        self.reasoning_tokens = 0
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
            self.reasoning_tokens = item.reasoning_tokens
            if item.reasoning:
                self.reasoning.append(item.reasoning)
            yield item

    @property
    def thought(self) -> str:
        """The thinking so far, for a model that thinks."""
        return "".join(self.reasoning)

    async def text(self) -> str:
        """The whole completion, its answer alone where the model thinks (cancels the sequence if the caller
        is cancelled meanwhile)."""
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
    thinking: Tracker | None = None  # where it is in a thinking model's output (the grammar waits for the answer)
    thought: TextStream | None = None  # the thinking's text (no stop strings: they apply to the answer)
    call: TextStream | None = None  # a harmony tool call's arguments, as they come
    arguments: str = ""  # what ``call`` released so far
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, where asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # until the first chunk takes them
    sent: int = 0  # tokens already handed out in chunks
    said: bool = False  # some of the answer's text was handed out
    done: bool = False
    failed: bool = False  # its grammar failed: it ends with an error
    row: int = -1  # its row in the model's cache, once admitted
    fed: int = 0  # prompt positions in its row (run, or copied from the prefix cache)
    prefill_s: float = 0.0  # the time its prompt's chunks took
    entries: list[TokenLogprob | None] = field(default_factory=list)  # its prompt's log-probabilities so far

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt_ids)

    @property
    def scores_prompt(self) -> bool:
        """Its prompt's log-probabilities are asked (completions' echo): every position's logits."""
        return self.request.prompt_logprobs and self.request.logprobs is not None

    def next_input(self) -> int:
        return self.tokens[-1]

    def wants_mask(self) -> bool:
        """A grammar's mask is needed for a step whose logits will be sampled (not while thinking: the
        grammar constrains the answer)."""
        return self.constraint is not None and (self.thinking is None or self.thinking.answering)

    def chunk_end(self, size: int) -> int:
        """Where its next prompt chunk ends: at the next multiple of ``size``, or the prompt's end. Chunks
        fall at the same positions whatever runs beside, so a prompt's logits never depend on its neighbours."""
        return min((self.fed // size + 1) * size, len(self.request.prompt_ids))

    def score(self, logits: FloatArray) -> None:
        """Take the logits of the prompt positions from ``fed`` on: each scores the token after it."""
        ids, top = self.request.prompt_ids, self.request.logprobs or 0
        if self.fed == 0:
            self.entries = [None]  # the first token has no context to be scored in
        for j, row in enumerate(logits):
            if (p := self.fed + j + 1) < len(ids):
                self.entries.append(token_logprob(row, ids[p], top))
        if self.fed + len(logits) == len(ids):
            self.prompt_logprobs, self.entries = tuple(self.entries), []

    def advance(self, logits: FloatArray, eos: frozenset[int], allowed: BoolArray | None = None) -> Chunk | None:
        """Sample from this row's logits (among the tokens its grammar allows) and take the token; return
        the chunk to deliver, None while there is nothing to say."""
        thinking = self.thinking
        forced = thinking.forced() if thinking is not None else None
        if allowed is not None and thinking is not None and (extra := thinking.also_allowed()):
            allowed = allowed.copy()  # a grammar constrains the answer: thinking may still come first
            allowed[list(extra)] = True
        token = forced if forced is not None else self.sampler.pick(logits, allowed)
        if self.request.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.request.logprobs))
        chunk = self._advance(token, eos)
        if not chunk.text and not chunk.reasoning and chunk.finish_reason is None:
            return None
        ids, lps = tuple(self.tokens[self.sent :]), tuple(self.logprobs[self.sent :])
        self.sent = len(self.tokens)
        prompt, self.prompt_logprobs = self.prompt_logprobs, ()
        spent = thinking.tokens if thinking is not None else 0
        return Chunk(chunk.text, chunk.completion_tokens, chunk.finish_reason, ids, lps, prompt, chunk.reasoning, spent)

    def _advance(self, token: int, eos: frozenset[int]) -> Chunk:
        req = self.request
        self.tokens.append(token)
        n = len(self.tokens)
        # A grammar allows the end of sequence only once it is complete: then it ends, ignore_eos or not.
        if (token in eos and (not req.ignore_eos or self.constraint)) or token in req.stop_token_ids:
            self.done = True  # gpt-oss's <|call|> is one of its ends: a call it closes is complete
            return Chunk(self.text.finish() + self._called(), n, "stop", reasoning=self._thought_rest())
        self.sampler.observe(token)
        constrained = self.constraint is not None and (self.thinking is None or self.thinking.answering)
        kind = self.thinking.take(token) if self.thinking is not None else "answer"
        text = thought = ""
        if kind == "answer":
            if constrained and self.constraint is not None:  # not harmony's commentary: the grammar is the final's
                self.constraint.consume(token)
            text = self._answer(self.text.push(token))
        elif kind == "call" and self.call is not None:
            self.arguments += self.call.push(token)
        elif kind == "called":
            text = self._answer(self._called())
        elif kind == "think" and self.thought is not None:
            thought = self.thought.push(token)
        elif kind == "close" and self.thought is not None:
            thought = self.thought.finish()
            self.thought.reset()  # harmony may think again in another analysis message
        if self.text.stopped or (self.constraint is not None and self.constraint.finished):
            self.done = True  # a complete grammar takes nothing but the end of sequence: end now
            return Chunk(text + self._answer(self.text.finish()), n, "stop", reasoning=thought)
        if n >= req.max_tokens or len(req.prompt_ids) + n >= self.reserve:
            self.done = True
            rest = self._answer(self.text.finish() + self._called(complete=False))
            return Chunk(text + rest, n, "length", reasoning=thought + self._thought_rest())
        return Chunk(text, n, reasoning=thought)

    def _answer(self, text: str) -> str:
        """The answer's text; after thinking, without the blank lines between the end tag and the answer."""
        if self.thinking is not None and self.thinking.entered and not self.said:
            text = text.lstrip()
            self.said = bool(text)
        return text

    def _called(self, complete: bool = True) -> str:
        """A harmony tool call read so far, as the generic ``<tool_call>`` block the API reads back (a call
        cut short by max_tokens: its arguments as plain text); "" where no call was being read."""
        name = self.thinking.recipient() if self.thinking is not None else None
        if self.call is None or name is None:
            return ""
        arguments, self.arguments = self.arguments + self.call.finish(), ""
        self.call.reset()
        return written((ToolCall("", name, arguments),)) if complete else arguments

    def _thought_rest(self) -> str:
        """What the thinking held back, where the sequence ends inside it."""
        return self.thought.finish() if self.thought is not None else ""


def sequence(
    request: GenerationRequest,
    stream: GenerationStream,
    tokenizer: Tokenizer,
    vocab_size: int,
    reserve: int,
    constraint: Constraint | None = None,
) -> _Sequence:
    """One request's sequence, with what reads its output: the answer's text, and where the model thinks,
    the tracker that splits thinking from answer (and reads harmony's tool calls), with their texts."""
    sampler = Sampler(request.sampling, vocab_size, list(request.prompt_ids))
    seq = _Sequence(request, stream, sampler, TextStream(tokenizer, request.stop), reserve, time.time(), constraint)
    if request.thinking is not None:
        seq.thinking = request.thinking.tracker(lambda ids: str(tokenizer.decode(list(ids), skip_special_tokens=False)))
        seq.thought, seq.call = TextStream(tokenizer), TextStream(tokenizer)
    return seq


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
        seq = sequence(request, stream, self.model.tokenizer, self.model.lm.vocab_size, reserve, constraint)
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
        """Give what fits a row (its prompt then runs in chunks, in ``_step``); into ``joining``, the
        caller's list, so a fault midway loses none of them."""
        now = time.time()
        ordered = sorted(waiting, key=lambda s: (rank(s.request.priority, now - s.enqueued, 0), s.enqueued))
        waiting.clear()
        waiting.extend(ordered)
        while waiting:
            seq = waiting[0]
            if seq.stream.cancelled:
                waiting.popleft()
                self._left_queue(1)
                self.stats.cancelled += 1
                continue
            if not self._fits(seq, [*rows, *joining]):
                break
            waiting.popleft()
            self._left_queue(1)
            self.stats.queue_wait.observe(time.time() - seq.enqueued)
            try:
                # Where every position's logits are asked, none comes from the prefix cache.
                seq.row, seq.fed = self.model.lm.open(seq.request.prompt_ids, reuse=not seq.scores_prompt)
            except Exception as exc:
                self.stats.failed += 1
                log.exception("a prompt of %s found no row", self.name)
                self._fail([seq], RuntimeError(f"generation failed: {exc}"))
                continue
            self.stats.prefill_tokens += seq.fed
            joining.append(seq)

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
        """One decode step for the rows whose prompts are in, then prompt chunks (decode first: a running
        stream waits for at most one chunk's worth of prompt)."""
        decoding = [s for s in rows if not s.prefilling]
        if decoding:
            self._decode(decoding)
        prefilling = [s for s in rows if s.prefilling and not s.stream.cancelled]
        if prefilling:
            self._chunks(prefilling)

    def _decode(self, rows: list[_Sequence]) -> None:
        started = time.perf_counter()
        lm = self.model.lm
        step = partial(lm.decode, [s.row for s in rows], [s.next_input() for s in rows])
        logits, masks = self._while_masking(rows, step)
        eos = self.model.eos_token_ids
        chunks: list[tuple[_Sequence, Chunk | None]] = []
        broken: list[tuple[_Sequence, ValueError]] = []
        for i, s in enumerate(rows):
            try:
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
        st.decode_tokens += len(rows)
        st.generated_tokens += len(rows) - len(broken)
        st.largest_batch = max(st.largest_batch, len(rows))
        rate = len(rows) / max(elapsed, 1e-6)
        st.tokens_per_s = ewma(st.tokens_per_s, rate)
        self._finish(chunks, broken)

    def _chunks(self, rows: list[_Sequence]) -> None:
        """Run prompt chunks, oldest rows first, up to ``prefill_chunk_tokens`` positions (at least one
        chunk). A prompt whose last chunk ran samples its first token, as a decode step would."""
        lm, size = self.model.lm, self.limits.prefill_chunk_tokens
        budget, ran = size, False
        chunks: list[tuple[_Sequence, Chunk | None]] = []
        broken: list[tuple[_Sequence, BaseException]] = []
        for s in rows:
            ids = s.request.prompt_ids
            # Scored prompts come out a chunk of at most SCORED_CHUNK positions' logits at a time (memory:
            # positions x vocabulary floats), or a position a run where the graph returns no more.
            step = min(size, SCORED_CHUNK, lm.logits_kept) if s.scores_prompt else size
            end = s.chunk_end(step) if lm.chunks else len(ids)
            if ran and end - s.fed > budget:
                continue
            n = end - s.fed
            ran, budget = True, budget - n
            started = time.perf_counter()
            try:
                run = partial(lm.extend, s.row, ids[s.fed : end], n if s.scores_prompt else 1)
                last = end == len(ids)
                logits, masks = self._while_masking([s], run) if last else (run(), [None])
                if s.scores_prompt:
                    s.score(logits)
                s.fed = end
                self.stats.prefill_tokens += n
                s.prefill_s += time.perf_counter() - started
                if last:
                    chunks.append((s, self._first(s, logits[-1], masks[0])))
            except Exception as exc:
                why = self._row_failure(exc, s) if isinstance(exc, ValueError) else None
                if why is None:
                    log.exception("prefill failed for %s", self.name)
                else:
                    log.warning("a sequence of %s failed: %s", self.name, why)
                s.done = s.failed = True
                broken.append((s, why or RuntimeError(f"generation failed: {exc}")))
        self._finish(chunks, broken)

    def _first(self, s: _Sequence, logits: FloatArray, allowed: BoolArray | None) -> Chunk | None:
        """The prompt is in: its first token (or, with nothing to generate, its scores alone)."""
        st = self.stats
        st.prefill_time.observe(s.prefill_s)
        self.model.lm.remember(s.row, s.request.prompt_ids)
        if s.request.max_tokens == 0:
            s.done = True
            return Chunk("", 0, "length", prompt_logprobs=s.prompt_logprobs)
        st.generated_tokens += 1
        return s.advance(logits, self.model.eos_token_ids, allowed)

    def _finish(
        self, chunks: list[tuple[_Sequence, Chunk | None]], broken: Sequence[tuple[_Sequence, BaseException]]
    ) -> None:
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
