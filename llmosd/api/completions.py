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

from llmosd.api.chat_answers import Deltas, message
from llmosd.api.errors import ApiError, bad_request
from llmosd.api.gen_requests import ChatRequest, CompletionRequest, Sampling
from llmosd.api.logprobs import Logprobs
from llmosd.api.metrics import MODEL_KEY
from llmosd.api.ratelimit import STREAMS_KEY
from llmosd.api.requests import deadline, json_body, keep_alive_of, priority_of, timeout_of
from llmosd.api.state import hold, state
from llmosd.scheduler import (
    GenerationEngine,
    GenerationStream,
    GrammarFailed,
    prepare_chat,
    prepare_completion,
    start,
)

routes = web.RouteTableDef()


async def _engine(request: web.Request, model: str, body: dict[str, Any]) -> GenerationEngine:
    request[MODEL_KEY] = model
    served = await hold(request, model, keep_alive_of(body))
    if not served.generates:
        raise ApiError(400, f"model {model!r} is a {served.manifest.task} model: it does not generate text")
    return served.generator


def _usage(streams: list[GenerationStream], prompt_tokens: int, thinks: bool = False) -> dict[str, Any]:
    """OpenAI's usage; where the model thinks, how many of the completion's tokens were thinking."""
    completion = sum(s.completion_tokens for s in streams)
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if thinks:
        out["completion_tokens_details"] = {"reasoning_tokens": sum(s.reasoning_tokens for s in streams)}
    return out


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


async def _collect(streams: list[GenerationStream], sampling: Sampling) -> list[str]:
    try:
        return list(await asyncio.gather(*(s.text() for s in streams)))
    except GrammarFailed as exc:
        raise bad_request(str(exc), sampling.grammar_param) from None
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
    """How the answers show log-probabilities, where the request asked."""
    if s.logprobs is None:
        return None
    return Logprobs(lambda ids: engine.decode(ids, special=True), engine.stop_ids(s.stop_token_ids, s.ignore_eos))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    st = state(request)
    body = await json_body(request)
    req = CompletionRequest.parse(body, st.config)
    priority, timeout = priority_of(request, body), timeout_of(request)
    s = req.sampling
    engine = await _engine(request, s.model, body)
    prepared = await prepare_completion(engine, s.options(priority, st.config), req.prompts)
    streams = request[STREAMS_KEY] = start(engine, prepared)  # their tokens count against the rate limit
    prompts, prompt_tokens = prepared.prompts, prepared.prompt_tokens
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [engine.decode(p) if req.echo else "" for p in prompts]
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
            texts = await _collect(streams, s)
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
    prepared = await prepare_chat(engine, req.options(priority, st.config), req.messages, req.tools.offered)
    streams = request[STREAMS_KEY] = start(engine, prepared)  # their tokens count against the rate limit
    prompt = prepared.prompts[0]
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    shape = _logprobs(engine, s)
    names = req.tools.names
    thinks = any(r.thinking is not None for r in prepared.requests)  # the answers are split
    shown = thinks and req.chat.include_reasoning

    def envelope(choices: list[dict[str, Any]], obj: str, **extra: Any) -> dict[str, Any]:
        return {"id": ident, "object": obj, "created": created, "model": s.model, "choices": choices} | extra

    if not s.stream:
        async with deadline(timeout):
            texts = await _collect(streams, s)
        choices = []
        for i, (text, stream) in enumerate(zip(texts, streams, strict=True)):
            said, finish = message(text, stream.finish_reason, names, stream.thought if shown else None)
            lps = shape.chat(stream.token_ids, stream.logprobs, stream.finish_reason) if shape else None
            choices.append({"index": i, "message": said, "logprobs": lps, "finish_reason": finish})
        return web.json_response(envelope(choices, "chat.completion", usage=_usage(streams, len(prompt), thinks)))

    deltas = [Deltas(names) for _ in streams]

    def frame(i: int, chunk: Any) -> list[dict[str, Any]]:
        lps = shape.chat(chunk.token_ids, chunk.logprobs, chunk.finish_reason) if shape else None
        return [
            envelope([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}], "chat.completion.chunk")
            for delta, finish, lp in deltas[i](chunk.text, chunk.finish_reason, lps, chunk.reasoning if shown else "")
        ]

    def usage() -> dict[str, Any]:
        return envelope([], "chat.completion.chunk", usage=_usage(streams, len(prompt), thinks))

    return await _stream(request, s, streams, frame, usage, timeout)
