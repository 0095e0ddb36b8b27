"""POST /v1/completions and /v1/chat/completions: whole answers, or server-sent events in OpenAI's chunk
format ending with ``data: [DONE]``. A client that goes away cancels its sequences at the next step."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from llmosd.api.errors import ApiError, bad_request
from llmosd.api.gen_requests import ChatRequest, CompletionRequest, Sampling
from llmosd.api.logprobs import Logprobs
from llmosd.api.metrics import MODEL_KEY
from llmosd.api.requests import deadline, json_body, keep_alive_of, priority_of, timeout_of
from llmosd.api.state import AppState, hold, state
from llmosd.runtime.chat import ChatTemplateError
from llmosd.runtime.generator import TextGenerator
from llmosd.scheduler import GenerationEngine, GenerationRequest, GenerationStream, RequestTooLarge

routes = web.RouteTableDef()


async def _engine(request: web.Request, model: str, body: dict[str, Any]) -> GenerationEngine:
    request[MODEL_KEY] = model
    served = await hold(request, model, keep_alive_of(body))
    if not served.generates:
        raise ApiError(400, f"model {model!r} is a {served.manifest.task} model: it does not generate text")
    return served.generator


def _start(
    st: AppState, engine: GenerationEngine, s: Sampling, prompts: list[list[int]], priority: int
) -> list[GenerationStream]:
    """Submit n sequences per prompt (choice index = prompt * n + i), all or none."""
    vocab = engine.model.lm.vocab_size
    if any(t >= vocab for t, _ in s.params.logit_bias):
        raise bad_request(f"'logit_bias' names token ids outside the vocabulary (it has {vocab})", "logit_bias")
    streams: list[GenerationStream] = []
    try:
        for ids in prompts:
            room = engine.model.context_length - len(ids)
            defaults = engine.model.sampling_defaults
            fallback = int(defaults.get("max_tokens", st.config.default_max_tokens))
            max_tokens = s.max_tokens if s.max_tokens is not None else min(fallback, room)
            for i in range(s.n):
                params = s.params_for(defaults)
                if params.seed is not None and i:  # n choices from one seed must differ, reproducibly
                    params = type(params)(**{**params.__dict__, "seed": (params.seed + i) % 2**64})
                request = GenerationRequest(
                    tuple(ids),
                    params,
                    max_tokens if s.max_tokens == 0 else max(max_tokens, 1),  # 0: echo only
                    s.stop,
                    s.stop_token_ids,
                    s.ignore_eos,
                    priority,
                    s.logprobs,
                    s.prompt_logprobs,
                )
                streams.append(engine.submit(request))
    except RequestTooLarge as exc:
        for stream in streams:
            stream.cancel()
        raise bad_request(str(exc), "max_tokens") from None
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def _usage(streams: list[GenerationStream], prompt_tokens: int) -> dict[str, int]:
    completion = sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _merged(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, chunk) from every stream as they come; the first failure is raised."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    out: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: GenerationStream) -> None:
        try:
            async for chunk in stream:
                await out.put((i, chunk))
        except Exception as exc:
            await out.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            i, item = await out.get()
            if isinstance(item, Exception):
                raise item
            finished += item.finish_reason is not None
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _collect(streams: list[GenerationStream]) -> list[str]:
    try:
        return list(await asyncio.gather(*(s.text() for s in streams)))
    finally:
        for s in streams:
            if s.finish_reason is None:
                s.cancel()


Frame = Callable[[int, Any], list[dict[str, Any]]]


async def _stream(
    request: web.Request,
    s: Sampling,
    streams: list[GenerationStream],
    frame: Frame,
    usage: Callable[[], dict[str, Any]],
    timeout: float | None,
) -> web.StreamResponse:
    """Write each chunk as SSE events (``frame`` builds them), the usage chunk if asked, then [DONE].
    A client that leaves cancels every sequence; a failure after the headers is reported in-band."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(event: dict[str, Any] | str) -> None:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        await response.write(f"data: {data}\n\n".encode())

    try:
        async with asyncio.timeout(timeout):
            async for i, chunk in _merged(streams):
                for event in frame(i, chunk):
                    await send(event)
        if s.include_usage:
            await send(usage())
        await send("[DONE]")
    except (ConnectionResetError, asyncio.CancelledError):
        for stream in streams:
            stream.cancel()
        raise
    except TimeoutError:
        for stream in streams:
            stream.cancel()
        message = f"the request did not finish within its X-Request-Timeout of {timeout:g} s"
        await send({"error": {"type": "timeout_error", "message": message}})
    except Exception as exc:
        for stream in streams:
            stream.cancel()
        await send({"error": {"type": "server_error", "message": str(exc)}})
    await response.write_eof()
    return response


def _finished(stream: GenerationStream) -> tuple[str | None, list[int], list[Any], tuple[Any, ...]]:
    return stream.finish_reason, stream.token_ids, stream.logprobs, stream.prompt_logprobs


def _logprobs(engine: GenerationEngine, s: Sampling) -> Logprobs | None:
    """How the answers show log-probabilities, where the request asked: its stop_token_ids and end of
    sequence are ids a sequence stops on without showing them."""
    if s.logprobs is None:
        return None
    return Logprobs(
        engine.model.tokenizer, s.stop_token_ids | (frozenset() if s.ignore_eos else engine.model.eos_token_ids)
    )


async def _encode(model: TextGenerator, prompts: list[str | list[int]]) -> list[list[int]]:
    def run() -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            ids = model.encode(p, special=True) if isinstance(p, str) else list(p)
            if any(t < 0 or t >= model.lm.vocab_size for t in ids):
                raise bad_request(f"prompt {i} holds token ids outside the vocabulary", "prompt")
            out.append(ids)
        return out

    return await asyncio.to_thread(run)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    body = await json_body(request)
    req = CompletionRequest.parse(body, st.config)
    priority, timeout = priority_of(request, body), timeout_of(request)
    s = req.sampling
    engine = await _engine(request, s.model, body)
    prompts = await _encode(engine.model, req.prompts)
    streams = _start(st, engine, s, prompts, priority)
    prompt_tokens = sum(len(p) for p in prompts)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [engine.model.tokenizer.decode(p) if req.echo else "" for p in prompts]
    shape = _logprobs(engine, s)
    offsets = [0] * len(streams)  # where each choice's next token's text starts (a stream's chunks)

    def choice(i: int, text: str, finish: str | None, ids: Any = (), lps: Any = (), prompt: Any = ()) -> dict[str, Any]:
        logprobs = None
        if shape is not None:
            logprobs = shape.completion(prompts[i // s.n], prompt, ids, lps, finish, offsets[i])
            offsets[i] += sum(len(t) for t in logprobs["tokens"])
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": ident, "object": "text_completion", "created": created, "model": s.model, "choices": choices} | (
            extra
        )

    if not s.stream:
        async with deadline(timeout):
            texts = await _collect(streams)
        choices = [choice(i, echo[i // s.n] + t, *_finished(streams[i])) for i, t in enumerate(texts)]
        return web.json_response(envelope(choices, usage=_usage(streams, prompt_tokens)))

    started: set[int] = set()

    def frame(i: int, chunk: Any) -> list[dict[str, Any]]:
        text = chunk.text
        if i not in started:
            started.add(i)
            text = echo[i // s.n] + text
        if not text and chunk.finish_reason is None:
            return []
        return [
            envelope([choice(i, text, chunk.finish_reason, chunk.token_ids, chunk.logprobs, chunk.prompt_logprobs)])
        ]

    return await _stream(
        request, s, streams, frame, lambda: envelope([], usage=_usage(streams, prompt_tokens)), timeout
    )


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    body = await json_body(request)
    req = ChatRequest.parse(body, st.config)
    priority, timeout = priority_of(request, body), timeout_of(request)
    s = req.sampling
    engine = await _engine(request, s.model, body)
    try:
        prompt = await asyncio.to_thread(engine.model.render_chat, req.messages)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    except ValueError as exc:
        raise bad_request(str(exc), "model") from None
    streams = _start(st, engine, s, [prompt], priority)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    shape = _logprobs(engine, s)

    def envelope(choices: list[dict[str, Any]], obj: str, **extra: Any) -> dict[str, Any]:
        return {"id": ident, "object": obj, "created": created, "model": s.model, "choices": choices} | extra

    if not s.stream:
        async with deadline(timeout):
            texts = await _collect(streams)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": shape.chat(stream.token_ids, stream.logprobs, stream.finish_reason) if shape else None,
                "finish_reason": stream.finish_reason,
            }
            for i, (t, stream) in enumerate(zip(texts, streams, strict=True))
        ]
        return web.json_response(envelope(choices, "chat.completion", usage=_usage(streams, len(prompt))))

    started: set[int] = set()

    def frame(i: int, chunk: Any) -> list[dict[str, Any]]:
        def event(delta: dict[str, Any], finish: str | None = None, lps: Any = None) -> dict[str, Any]:
            choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
            return envelope([choice], "chat.completion.chunk")

        events = []
        lps = shape.chat(chunk.token_ids, chunk.logprobs, chunk.finish_reason) if shape else None
        if i not in started:  # OpenAI's first chunk of a choice names the role
            started.add(i)
            events.append(event({"role": "assistant", "content": chunk.text}, lps=lps))
        elif chunk.text or (lps and lps["content"]):
            events.append(event({"content": chunk.text}, lps=lps))
        if chunk.finish_reason is not None:  # and the last one carries only the reason
            events.append(event({}, chunk.finish_reason))
        return events

    def usage() -> dict[str, Any]:
        return envelope([], "chat.completion.chunk", usage=_usage(streams, len(prompt)))

    return await _stream(request, s, streams, frame, usage, timeout)
