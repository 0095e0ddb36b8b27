"""The generation engine in process, on real ONNX Runtime sessions: SmolLM2 int4 from the session store,
and tiny random Llama / GPT-2 exports held to PyTorch's own greedy generate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pytest

from llmosd.runtime import LoadedModel, ProviderSelector, load
from llmosd.runtime.causal_lm import CausalLM, RightAlignedRows
from llmosd.runtime.chat import Message
from llmosd.runtime.decoder import Decoder
from llmosd.runtime.fused_lm import FusedLM
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.grammar import GrammarSpec
from llmosd.runtime.sampling import SamplingParams
from llmosd.scheduler import (
    Chunk,
    GenerationEngine,
    GenerationLimits,
    GenerationRequest,
    GenerationStream,
    QueueFull,
    RequestTooLarge,
)
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import SMOLLM2, export
from tests.test_export_generation import tiny_causal_lm

pytestmark = pytest.mark.slow  # builds and exports random-weight models from PyTorch

GREEDY = SamplingParams(temperature=0)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 10."]


@pytest.fixture(scope="module")
def smol(store_dir: Path) -> Iterator[TextGenerator]:
    store = ModelStore(store_dir)
    loaded = load(store, store.manifest(SMOLLM2), ProviderSelector("cpu", 2, False), discover().adapters())
    assert isinstance(loaded.backend, TextGenerator)
    yield loaded.backend


def chat(model: TextGenerator, text: str, max_tokens: int = 24, **kw: object) -> GenerationRequest:
    ids = tuple(model.render_chat([Message("user", text)]))
    return GenerationRequest(ids, kw.pop("sampling", GREEDY), max_tokens, **kw)  # type: ignore[arg-type]


async def started(model: TextGenerator, limits: GenerationLimits | None = None) -> GenerationEngine:
    engine = GenerationEngine("m", model, limits or GenerationLimits())
    engine.start()
    return engine


class StepGate:
    """Parks the engine's worker before each decode step until the test lets one through, so rows that
    must still be running when others join cannot finish first, however fast the model or slow the
    event loop (CI's two shared cores finished a tiny model's 12 tokens before the third row joined).
    Only ``lm.decode`` is wrapped, on the instance; the engine runs as it does in service."""

    def __init__(self, lm: Decoder) -> None:
        self.lm = lm
        self.decode = lm.decode
        self.permits = threading.Semaphore(0)
        self.parked = threading.Event()
        self.open = False

    def __enter__(self) -> StepGate:
        self.lm.decode = self._gated  # type: ignore[method-assign]
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
        del self.lm.decode

    def _gated(self, rows: list[int], tokens: list[int]) -> Any:
        if not self.open:
            self.parked.set()
            self.permits.acquire()
        return self.decode(rows, tokens)

    async def until(self, reached: Callable[[], bool]) -> None:
        """Let parked decode steps through one at a time until ``reached()``."""
        for _ in range(4000):
            if reached():
                return
            if self.parked.is_set():
                self.parked.clear()
                self.permits.release()
            await asyncio.sleep(0.005)
        raise AssertionError("the engine never got there")

    async def first_chunk(self, stream: GenerationStream) -> Chunk:
        task = asyncio.ensure_future(anext(aiter(stream)))
        await self.until(task.done)
        return task.result()

    def release(self) -> None:
        self.open = True
        self.permits.release(1000)


async def test_rows_joining_a_running_batch_generate_what_they_generate_alone(smol: TextGenerator) -> None:
    engine = await started(smol)
    try:
        alone = [await engine.submit(chat(smol, p)).text() for p in PROMPTS]
        with StepGate(smol.lm) as gate:
            first = engine.submit(chat(smol, PROMPTS[0]))
            pieces = [(await gate.first_chunk(first)).text]
            while len(pieces) < 3:  # the others join only once the first is decoding
                pieces.append((await gate.first_chunk(first)).text)
            late = [engine.submit(chat(smol, p)) for p in PROMPTS[1:]]
            heads = [(await gate.first_chunk(s)).text for s in late]
            gate.release()
            rest = await asyncio.gather(first.text(), *(s.text() for s in late))
        assert ["".join(pieces) + rest[0], *(h + r for h, r in zip(heads, rest[1:], strict=True))] == alone
        assert engine.stats.largest_batch == 3
        assert all(s.finish_reason in ("stop", "length") for s in (first, *late))
    finally:
        await engine.close()


async def test_a_short_request_overtakes_a_long_one(smol: TextGenerator) -> None:
    engine = await started(smol)
    try:
        with StepGate(smol.lm) as gate:  # decode steps only as the short one needs them
            long = engine.submit(chat(smol, "Tell me a long story.", 300, ignore_eos=True))
            await gate.first_chunk(long)
            short = engine.submit(chat(smol, "Hi", 3))
            text = asyncio.ensure_future(short.text())
            await gate.until(text.done)
            await text
            assert short.finish_reason == "length" and short.completion_tokens == 3
            assert long.finish_reason is None  # still generating: no head-of-line blocking
            long.cancel()
        assert engine.stats.largest_batch == 2  # side by side, not one after the other
    finally:
        await engine.close()


async def test_cancelling_frees_the_row_at_the_next_step(smol: TextGenerator) -> None:
    engine = await started(smol)
    try:
        stream = engine.submit(chat(smol, "Tell me a long story.", 500, ignore_eos=True))
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        stream.cancel()
        for _ in range(100):
            if engine.stats.cancelled == 1 and engine.stats.running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats.cancelled == 1 and engine.stats.running == 0
        assert engine.stats.decode_tokens < 100
    finally:
        await engine.close()


async def test_the_kv_budget_bounds_running_rows_and_the_queue_answers_429(smol: TextGenerator) -> None:
    probe = chat(smol, "Say something.", 16)
    reserve = len(probe.prompt_ids) + 16
    per_row = reserve * smol.lm.bytes_per_token
    engine = await started(smol, GenerationLimits(kv_cache_bytes=2 * per_row, max_queue=3))
    try:
        streams = [engine.submit(probe) for _ in range(3)]  # 2 run, 1 waits
        with pytest.raises(QueueFull):
            [engine.submit(probe) for _ in range(3)]
        texts = await asyncio.gather(*(s.text() for s in streams))
        assert len(set(texts)) == 1  # greedy: the rows that waited generate the same
        assert engine.stats.largest_batch == 2
        with pytest.raises(RequestTooLarge, match="KV cache"):
            engine.submit(chat(smol, "Say something.", 2 * reserve))
        with pytest.raises(RequestTooLarge, match="context"):
            engine.submit(chat(smol, "Say something.", smol.context_length))
        with pytest.raises(RequestTooLarge, match="context"):
            engine.submit(GenerationRequest(tuple([1] * smol.context_length), GREEDY, 1))
    finally:
        await engine.close()


async def test_eos_stop_ids_and_max_tokens_end_a_sequence(smol: TextGenerator) -> None:
    engine = await started(smol)
    try:
        s = engine.submit(chat(smol, "Reply with just the word yes.", 40))
        text = await s.text()
        assert s.finish_reason == "stop" and s.completion_tokens < 40 and "<|im_end|>" not in text
        free = engine.submit(chat(smol, "Reply with just the word yes.", 40, ignore_eos=True))
        await free.text()
        assert free.finish_reason == "length" and free.completion_tokens == 40
        # stop at the greedy continuation's third token: two tokens of text, the stop id not included
        ids = smol.encode(text, special=False)
        stopped = engine.submit(chat(smol, "Reply with just the word yes.", 40, stop_token_ids=frozenset([ids[2]])))
        out = await stopped.text()
        assert stopped.finish_reason == "stop" and stopped.completion_tokens == 3
        assert out == smol.tokenizer.decode(ids[:2])
    finally:
        await engine.close()


async def test_a_seed_reproduces_a_sampled_sequence_whatever_runs_beside_it(smol: TextGenerator) -> None:
    engine = await started(smol)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    try:
        alone = await engine.submit(chat(smol, "Invent a name for a cat.", 20, sampling=sampled)).text()
        other = engine.submit(chat(smol, "Count to twenty.", 40))
        again = await engine.submit(chat(smol, "Invent a name for a cat.", 20, sampling=sampled)).text()
        await other.text()
        reseeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99)
        different = await engine.submit(chat(smol, "Invent a name for a cat.", 20, sampling=reseeded)).text()
        assert alone == again and alone != different
    finally:
        await engine.close()


async def test_close_fails_what_is_waiting_or_running(smol: TextGenerator) -> None:
    from llmosd.scheduler import BatcherClosed

    engine = await started(smol)
    stream = engine.submit(chat(smol, "Tell me a long story.", 500, ignore_eos=True))
    await anext(aiter(stream))
    await engine.close()
    with pytest.raises(BatcherClosed):
        await stream.text()
    with pytest.raises(BatcherClosed):
        engine.submit(chat(smol, "Hi"))


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, LoadedModel]]:
    out = {}
    for kind in ("llama", "gpt2"):
        src = tiny_causal_lm(kind, tmp_path_factory.mktemp(f"src-{kind}"))
        state = tmp_path_factory.mktemp(f"state-{kind}")
        r = export(src, "text-generation", "fp32", f"tiny-{kind}", state)
        assert r.returncode == 0, r.stderr[-3000:]
        store = ModelStore(state)
        out[kind] = (
            src,
            load(store, store.manifest(f"tiny-{kind}"), ProviderSelector("cpu", 2, False), discover().adapters()),
        )
    return out


@pytest.mark.parametrize("chunk", [256, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
async def test_continuous_batching_reproduces_pytorch_greedy_generate(
    kind: str, chunk: int, tiny_lms: dict[str, tuple[Path, LoadedModel]]
) -> None:
    """Prompts of different lengths joining at different steps (left-padded cache, per-row positions)
    produce exactly what transformers' generate produces for each prompt alone; so do prompts run in
    chunks of 3 positions between the others' decode steps (the fused graph; optimum's runs them whole)."""
    import torch
    from transformers import AutoModelForCausalLM

    src, loaded = tiny_lms[kind]
    model = loaded.backend
    assert isinstance(model, TextGenerator)
    # a Llama is built fused (cache written in place, slots); GPT-2 keeps optimum's graph
    assert isinstance(model.lm, FusedLM if kind == "llama" else RightAlignedRows)
    prompts = ["hello world", "a much longer prompt about the weather in the mountains today", "one"]
    ids = [model.encode(p, special=False) for p in prompts]
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    expected = []
    with torch.no_grad():
        for p in ids:
            out = reference.generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0
            )
            expected.append(out[0, len(p) :].tolist())
    engine = await started(model, GenerationLimits(prefill_chunk_tokens=chunk))
    try:
        streams = []
        with StepGate(model.lm) as gate:
            for p in ids:  # each joins once the previous one is decoding
                streams.append(engine.submit(GenerationRequest(tuple(p), GREEDY, 12, ignore_eos=True)))
                await gate.first_chunk(streams[-1])
            gate.release()
            await asyncio.gather(*(s.text() for s in streams))
        assert engine.stats.largest_batch == 3
    finally:
        await engine.close()
    assert [s.token_ids for s in streams] == expected


def tiny_generator(tiny_lms: dict[str, tuple[Path, LoadedModel]], kind: str) -> tuple[Path, TextGenerator]:
    src, loaded = tiny_lms[kind]
    assert isinstance(loaded.backend, TextGenerator)
    return src, loaded.backend


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
async def test_logprobs_are_pytorchs_log_softmax_of_the_tokens_sampled(
    kind: str, tiny_lms: dict[str, tuple[Path, LoadedModel]]
) -> None:
    """Each sampled token's log-probability and its position's 5 likeliest, against PyTorch's
    log-softmax over the same prompt and tokens (fp32: within 1e-4), sampled at temperature 1."""
    import torch
    from transformers import AutoModelForCausalLM

    src, model = tiny_generator(tiny_lms, kind)
    prompt = model.encode("a prompt about the weather in the mountains", special=False)
    engine = await started(model)
    try:
        stream = engine.submit(
            GenerationRequest(tuple(prompt), SamplingParams(seed=7), 10, ignore_eos=True, logprobs=5)
        )
        await stream.text()
    finally:
        await engine.close()
    tokens = stream.token_ids
    assert [e.token for e in stream.logprobs] == tokens and len(tokens) == 10
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    expected = torch.log_softmax(logits.double(), dim=-1).numpy()
    for entry, row in zip(stream.logprobs, expected, strict=True):
        assert abs(entry.logprob - row[entry.token]) < 1e-4
        best = np.argsort(-row)[:5]
        assert [t for t, _ in entry.top] == best.tolist()
        assert np.allclose([lp for _, lp in entry.top], row[best], atol=1e-4)


async def test_a_constrained_greedy_row_takes_pytorchs_best_allowed_token(
    tiny_lms: dict[str, tuple[Path, LoadedModel]],
) -> None:
    """Under a grammar, greedy decoding takes at each step the token PyTorch's logits rank first among
    those a fresh matcher (replaying the same tokens) allows; an unconstrained row decodes beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    src, model = tiny_generator(tiny_lms, "llama")
    spec = GrammarSpec("regex", "[a-z#]{4,40}")  # MiniLM's WordPiece pieces: letters, and ## for the rest
    prompt = model.encode("the weather in the mountains", special=False)
    engine = await started(model)
    try:
        free = engine.submit(GenerationRequest(tuple(prompt), GREEDY, 12, ignore_eos=True))
        bound = engine.submit(GenerationRequest(tuple(prompt), GREEDY, 12), model.grammars.compile(spec))
        await asyncio.gather(free.text(), bound.text())
    finally:
        await engine.close()
    tokens = bound.token_ids
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 :].numpy()
    replay = model.grammars.compile(spec)
    overruled = 0
    for step, token in enumerate(tokens):
        allowed = model.grammars.fill_masks([replay], logits.shape[-1])[0]
        row = np.where(allowed, logits[step], -np.inf)
        assert token == int(np.argmax(row)), step
        overruled += int(np.argmax(logits[step])) != token
        if token not in model.eos_token_ids:
            replay.consume(token)
    assert overruled > 0 and len(free.token_ids) == 12  # the grammar decided some tokens; the free row ran on


async def test_a_prefix_hit_copies_the_cached_kv_and_changes_nothing(
    tiny_lms: dict[str, tuple[Path, LoadedModel]],
) -> None:
    """Prompts that share a long start: the second and third copy its cached blocks instead of prefilling
    them, and decode exactly what a cold cache (one with no prefix cache) decodes; the cache gives way to
    running rows' reservations."""
    _, model = tiny_generator(tiny_lms, "llama")
    shared = "the weather in the mountains changes fast and the hikers watch the sky " * 6
    prompts = [model.encode(shared + tail, special=False) for tail in ("so they turn back", "and keep going", "so")]
    cold = model.decoder(2, model.context_length)  # no prefix cache: every prompt prefilled whole
    assert cold.prefix is None and model.lm.prefix is not None
    expected = []
    for ids in prompts:
        logits, row = cold.prefill(ids)
        expected.append(logits)
        cold.free(row)
    engine = await started(model)
    try:
        before = (model.lm.prefix.stats.hits, model.lm.prefix.stats.hit_tokens)
        streams = []
        for ids in prompts:  # one after another: each finds what the previous ones left
            streams.append(engine.submit(GenerationRequest(tuple(ids), GREEDY, 6, ignore_eos=True, logprobs=0)))
            await streams[-1].text()
        hits = model.lm.prefix.stats.hits - before[0]
        hit_tokens = model.lm.prefix.stats.hit_tokens - before[1]
    finally:
        await engine.close()
    shared_blocks = min(len(p) for p in prompts) // 32
    assert hits == 2 and hit_tokens >= 2 * (shared_blocks - 1) * 32 > 0
    for stream, logits in zip(streams, expected, strict=True):
        # the first token's log-probability is the prefill's logits: equal, cached or not
        lp = stream.logprobs[0]
        ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) - logits.max()
        assert lp.token == int(np.argmax(logits)) and abs(lp.logprob - ref[lp.token]) < 1e-5
    for ids, stream in zip(prompts, streams, strict=True):
        ref_stream = cold_greedy(cold, ids, 6)
        assert stream.token_ids == ref_stream
    cache = model.lm.prefix
    cache.limit = cache.block_bytes  # what a long running row would leave: the cache gives way
    cache.shrink(cache.limit)
    assert cache.bytes <= cache.block_bytes


def cold_greedy(lm: Decoder, ids: list[int], n: int) -> list[int]:
    logits, row = lm.prefill(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = lm.decode([row], [out[-1]])[0]
    lm.free(row)
    return out


@pytest.mark.parametrize("chunk", [256, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
async def test_the_prompts_own_logprobs_are_pytorchs(
    kind: str, chunk: int, tiny_lms: dict[str, tuple[Path, LoadedModel]]
) -> None:
    """echo's scoring (lm-evaluation-harness's loglikelihood): each prompt token's log-probability given
    the ones before it, the first none; with max_tokens 0 nothing is generated and the row goes. The
    positions' logits come from the prompt's runs (every position's, in chunks of 3 where asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    src, model = tiny_generator(tiny_lms, kind)
    prompt = model.encode("the weather in the mountains is cold today", special=False)
    if kind == "llama":
        assert isinstance(model.lm, FusedLM) and model.lm.logits_kept > 1  # the recipe's graph keeps them
    engine = await started(model, GenerationLimits(prefill_chunk_tokens=chunk))
    try:
        scored = engine.submit(GenerationRequest(tuple(prompt), GREEDY, 0, logprobs=2, prompt_logprobs=True))
        assert await scored.text() == "" and scored.finish_reason == "length" and scored.token_ids == []
        both = engine.submit(GenerationRequest(tuple(prompt), GREEDY, 3, logprobs=2, prompt_logprobs=True))
        await both.text()
        for _ in range(200):  # the worker publishes its counts just after the last chunk goes out
            if engine.stats.running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats.running == 0 and engine.stats.completed == 2
    finally:
        await engine.close()
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].double(), dim=-1).numpy()
    for stream in (scored, both):
        entries = stream.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position, (token, entry) in enumerate(zip(prompt[1:], entries[1:], strict=True)):
            assert entry is not None and entry.token == token
            assert abs(entry.logprob - expected[position, token]) < 1e-4
            assert [t for t, _ in entry.top] == np.argsort(-expected[position])[:2].tolist()
    assert len(both.token_ids) == 3 and len(both.logprobs) == 3  # and then it generated


async def test_an_fp16_export_runs_with_an_fp16_kv_cache(tmp_path: Path) -> None:
    """fp16 is marked CUDA-only for serving, but its graph (fp16 past/present) runs on ORT's CPU provider
    too: the engine must carry an fp16 cache through joins and leaves, each row generating what it
    generates alone."""
    import onnxruntime as ort

    src = tiny_causal_lm("llama", tmp_path / "src")
    r = export(src, "text-generation", "fp16", "tiny", tmp_path / "state")
    assert r.returncode == 0, r.stderr[-3000:]
    store = ModelStore(tmp_path / "state")
    m = store.manifest("tiny")
    session = ort.InferenceSession(str(store.file_path(m, "model")), providers=["CPUExecutionProvider"])
    model = TextGenerator(session, store.file_path(m, "tokenizer"), m.runtime)
    model.warmup()  # as load() does: it also settles how a lone row is decoded
    assert model.lm.dtype == np.float16 and model.lm.bytes_per_token == 2 * 2 * 2 * 16 * 2
    prompts = [model.encode(p, special=False) for p in ("hello world", "one two three four five six", "x")]
    requests = [GenerationRequest(tuple(p), GREEDY, 10, ignore_eos=True) for p in prompts]
    engine = await started(model)
    try:
        alone = []
        for request in requests:
            stream = engine.submit(request)
            await stream.text()
            alone.append(stream.token_ids)
        streams = []
        with StepGate(model.lm) as gate:
            for request in requests:  # each joins once the previous one is decoding
                streams.append(engine.submit(request))
                await gate.first_chunk(streams[-1])
            gate.release()
            await asyncio.gather(*(s.text() for s in streams))
        assert engine.stats.largest_batch == 3
    finally:
        await engine.close()
    assert [s.token_ids for s in streams] == alone


@pytest.mark.parametrize("kind", ["gpt2"])  # the optimum graph's path (a Llama is fused: no io_binding switch)
async def test_io_binding_keeps_the_cache_as_ort_values_and_changes_nothing(
    kind: str, tiny_lms: dict[str, tuple[Path, LoadedModel]]
) -> None:
    """The CUDA path binds present key/values as ORT values and feeds them back; on the CPU provider the
    same code runs (the values stay in host memory), through joins and leaves, with identical tokens."""
    import onnxruntime as ort

    _, loaded = tiny_lms[kind]
    plain = loaded.backend
    assert isinstance(plain, TextGenerator)
    bound = TextGenerator.__new__(TextGenerator)
    bound.__dict__.update(plain.__dict__)
    assert isinstance(plain.lm, RightAlignedRows)
    bound.lm = RightAlignedRows(CausalLM(plain.lm.lm.session, plain.lm.vocab_size, io_binding=True))
    prompts = [plain.encode(p, special=False) for p in ("hello world", "the weather in the mountains", "one")]
    out = {}
    for name, model in (("plain", plain), ("bound", bound)):
        engine = await started(model)
        try:
            streams = []
            for p in prompts:
                streams.append(
                    engine.submit(GenerationRequest(tuple(p), GREEDY, 8 + 4 * len(streams), ignore_eos=True))
                )
                await anext(aiter(streams[-1]))
            await asyncio.gather(*(s.text() for s in streams))
        finally:
            await engine.close()
        out[name] = [s.token_ids for s in streams]
    assert out["bound"] == out["plain"]
    _, cache = bound.lm.lm.prefill(prompts[0])
    _, cache = bound.lm.lm.decode(cache, [1])
    assert isinstance(cache.arrays[0], ort.OrtValue) and cache.width == len(prompts[0]) + 1


async def test_high_priority_sequences_are_admitted_first(smol: TextGenerator) -> None:
    from llmosd.scheduler.priority import HIGH, LOW

    engine = await started(smol, GenerationLimits(max_sequences=1))
    try:
        base = chat(smol, "Hi", 2, ignore_eos=True)
        order: list[str] = []

        async def run(name: str, priority: int) -> None:
            stream = engine.submit(GenerationRequest(base.prompt_ids, GREEDY, 2, ignore_eos=True, priority=priority))
            await stream.text()
            order.append(name)

        with StepGate(smol.lm) as gate:  # the running row cannot finish before all three wait
            running = engine.submit(chat(smol, "Tell me a story.", 40, ignore_eos=True))
            await gate.first_chunk(running)
            tasks = [asyncio.create_task(run(f"low{i}", LOW)) for i in range(2)]
            await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(run("high", HIGH)))
            await gate.until(lambda: engine.stats.waiting_by_priority["high"] == 1)  # published after a step
            assert engine.stats.waiting_by_priority == {"high": 1, "normal": 0, "low": 2}
            assert running.finish_reason is None
            gate.release()
            await asyncio.gather(running.text(), *tasks)
        assert order == ["high", "low0", "low1"]
    finally:
        await engine.close()
