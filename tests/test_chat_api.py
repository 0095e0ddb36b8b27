"""/v1/completions and /v1/chat/completions on the real daemon process serving SmolLM2 int4: the
official openai client (sync, async, streaming, TCP and Unix socket), the exact SSE format, errors,
disconnects, and the llmosd Python client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import DEFAULT, SMOLLM2, Daemon

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def openai_clients(daemon: Daemon) -> list[Any]:
    import httpx2
    import openai

    return [
        openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed-on-loopback"),
        openai.OpenAI(
            base_url="http://llmosd/v1",
            api_key="not-needed-on-the-socket",
            http_client=openai.DefaultHttpx2Client(transport=httpx2.HTTPTransport(uds=str(daemon.socket))),
        ),
    ]


def test_openai_client_chat_and_completions_sync_over_tcp_and_unix_socket(daemon: Daemon) -> None:
    answers = []
    for client in openai_clients(daemon):
        with client:
            r = client.chat.completions.create(model=SMOLLM2, messages=QUESTION, max_tokens=24, temperature=0)
            answer = r.choices[0].message.content
            assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
            assert "Paris" in answer and r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            pieces = []
            finish = None
            for chunk in client.chat.completions.create(
                model=SMOLLM2, messages=QUESTION, max_tokens=24, temperature=0, stream=True
            ):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            assert "".join(pieces) == answer and finish == r.choices[0].finish_reason
            c = client.completions.create(model=SMOLLM2, prompt="The capital of France is", max_tokens=5, temperature=0)
            assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
            streamed = "".join(
                ch.choices[0].text
                for ch in client.completions.create(
                    model=SMOLLM2, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
                )
            )
            assert streamed == c.choices[0].text
            answers.append(answer)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_openai_async_client_streams_concurrently(daemon: Daemon, transport: str) -> None:
    import httpx2
    import openai

    if transport == "tcp":
        client = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x")
    else:
        uds = httpx2.AsyncHTTPTransport(uds=str(daemon.socket))
        client = openai.AsyncOpenAI(
            base_url="http://llmosd/v1", api_key="x", http_client=openai.DefaultAsyncHttpx2Client(transport=uds)
        )
    async with client:
        whole = await client.chat.completions.create(model=SMOLLM2, messages=QUESTION, max_tokens=24, temperature=0)
        assert "Paris" in (whole.choices[0].message.content or "")

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model=SMOLLM2,
                messages=[{"role": "user", "content": f"Write the number {i} in words."}],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one(i) for i in range(6)))
    assert all(texts) and len(set(texts)) > 1


async def sse_events(daemon: Daemon, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    async with aiohttp.ClientSession() as s, s.post(daemon.url + path, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    return raw, [e if e == "[DONE]" else json.loads(e) for e in events]


async def test_chat_stream_is_exactly_openais_chunk_format(daemon: Daemon) -> None:
    body = {"model": SMOLLM2, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    body["stream"] = True
    raw, events = await sse_events(daemon, "/v1/chat/completions", body | {"stream_options": {"include_usage": True}})
    assert raw.endswith("data: [DONE]\n\n") and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    # without stream_options there is no usage chunk
    _, plain = await sse_events(daemon, "/v1/chat/completions", body)
    assert all("usage" not in c for c in plain[:-1]) and plain[-1] == "[DONE]"


async def test_n_choices_multiple_prompts_stops_and_echo(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"model": SMOLLM2, "messages": QUESTION, "max_tokens": 12, "n": 3, "seed": 7, "temperature": 1.0}
        async with s.post(daemon.url + "/v1/chat/completions", json=body) as r:
            out = await r.json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert len({c["message"]["content"] for c in out["choices"]}) > 1  # n seeds differ
        async with s.post(daemon.url + "/v1/chat/completions", json=body) as r:
            again = await r.json()
        assert [c["message"] for c in again["choices"]] == [c["message"] for c in out["choices"]]  # seeded
        body = {"model": SMOLLM2, "prompt": ["1, 2, 3,", "a, b, c,"], "max_tokens": 20, "temperature": 0}
        async with s.post(daemon.url + "/v1/completions", json=body | {"stop": [" 6", " f"], "echo": True}) as r:
            out = await r.json()
        texts = [c["text"] for c in out["choices"]]
        assert texts == ["1, 2, 3, 4, 5,", "a, b, c, d, e,"] and {c["finish_reason"] for c in out["choices"]} == {
            "stop"
        }


BAD = [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "function.name"),
    ({"messages": QUESTION, "tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"messages": QUESTION, "tool_choice": "required"}, "needs 'tools'"),
    (
        {
            "messages": QUESTION,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "not one of the tools",
    ),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "two tools"),
    (
        {
            "messages": QUESTION,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
            "tool_choice": "required",
        },
        "cannot be compiled",
    ),
    (
        {
            "messages": QUESTION,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "both constrain",
    ),
    ({"messages": [*QUESTION, {"role": "tool", "content": "21 C"}]}, "tool_call_id"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                }
            ]
        },
        "not valid JSON",
    ),
    ({"messages": QUESTION, "functions": [{"name": "f"}]}, "legacy"),
    ({"messages": QUESTION, "temperature": 3}, "'temperature'"),
    ({"messages": QUESTION, "top_p": 0}, "'top_p'"),
    ({"messages": QUESTION, "max_tokens": 0}, "'max_tokens'"),
    ({"messages": QUESTION, "n": 100}, "'n'"),
    ({"messages": QUESTION, "stop": [1]}, "'stop'"),
    ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": QUESTION, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
    (
        {
            "messages": QUESTION,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
        },
        "cannot be compiled: Invalid type: strin",
    ),
    ({"messages": QUESTION, "guided_regex": "[0-9"}, "cannot be compiled"),
    ({"messages": QUESTION, "guided_grammar": "root ::= missing"}, "cannot be compiled"),
    ({"messages": QUESTION, "guided_choice": []}, "'guided_choice'"),
    ({"messages": QUESTION, "guided_json": "{not json"}, "not valid JSON"),
    ({"messages": QUESTION, "structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ({"messages": QUESTION, "response_format": {"type": "json_object"}, "guided_regex": "a"}, "both constrain"),
    ({"messages": QUESTION, "logit_bias": {"abc": 1}}, "keys must be token ids"),
    ({"messages": QUESTION, "logit_bias": {"5": 101}}, "[-100, 100]"),
    ({"messages": QUESTION, "logit_bias": [5]}, "'logit_bias'"),
    ({"messages": QUESTION, "logit_bias": {"999999": 5}}, "outside the vocabulary"),
    ({"messages": QUESTION, "min_p": 1.5}, "'min_p'"),
    ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "'top_logprobs'"),
    ({"messages": QUESTION, "top_logprobs": 2}, "needs 'logprobs': true"),
    ({"messages": QUESTION, "logprobs": 3}, "'logprobs'"),
    ({"messages": QUESTION, "max_tokens": 8190}, "together more than the context of 8192"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "context"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
async def test_bad_chat_requests_get_a_400_and_change_nothing(
    daemon: Daemon, extra: dict[str, Any], message: str
) -> None:
    async with aiohttp.ClientSession() as s:
        before = await status(s, daemon)
        async with s.post(daemon.url + "/v1/chat/completions", json={"model": SMOLLM2, **extra}) as r:
            body = await r.json()
        assert r.status == 400 and message in body["error"]["message"] + str(body["error"].get("param")), body
        after = await status(s, daemon)
        assert after["requests"] == before["requests"] and after["running"] == 0


async def test_logit_bias_and_min_p_steer_sampling(daemon: Daemon, store_dir: Path) -> None:
    """logit_bias +100 forces a token even when greedy, -100 bans one; min_p 1 keeps only the best token,
    so at temperature 1 it decodes what greedy decodes."""
    from tokenizers import Tokenizer

    from llmosd.store import ModelStore

    store = ModelStore(store_dir)
    tokenizer = Tokenizer.from_file(str(store.file_path(store.manifest(SMOLLM2), "tokenizer")))
    banana = tokenizer.encode(" banana", add_special_tokens=False).ids[0]
    prompt = "The capital of France is"

    async def complete(s: aiohttp.ClientSession, **extra: Any) -> str:
        body = {"model": SMOLLM2, "prompt": prompt, "max_tokens": 4, **extra}
        async with s.post(daemon.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["choices"][0]["text"])

    async with aiohttp.ClientSession() as s:
        greedy = await complete(s, temperature=0)
        assert await complete(s, temperature=0, logit_bias={str(banana): 100}) == tokenizer.decode([banana] * 4)
        first = tokenizer.encode(greedy, add_special_tokens=False).ids[0]
        banned = await complete(s, temperature=0, logit_bias={str(first): -100})
        assert tokenizer.encode(banned, add_special_tokens=False).ids[0] != first
        assert await complete(s, temperature=1.0, min_p=1.0, seed=3) == greedy


def test_logprobs_through_the_openai_client_chat_and_completions(daemon: Daemon) -> None:
    """The SDK's own types parse both shapes; the tokens spell the answer; greedy picks the likeliest."""
    import openai

    with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x") as client:
        kw: dict[str, Any] = {"model": SMOLLM2, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
        r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert "".join(e.token for e in content) == r.choices[0].message.content and len(content) <= 12
        for e in content:
            assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.token == e.top_logprobs[0].token
            assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
            assert bytes(e.bytes) == e.token.encode()
        streamed = [
            e
            for chunk in client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True)
            if chunk.choices and chunk.choices[0].logprobs
            for e in chunk.choices[0].logprobs.content or []
        ]
        assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
        assert client.chat.completions.create(**kw).choices[0].logprobs is None  # only when asked
        c = client.completions.create(
            model=SMOLLM2, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
        )
        lp = c.choices[0].logprobs
        assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 6
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
        assert all(
            len(top) <= 2 and max(top.values()) >= v - 1e-6
            for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
        )


async def test_echo_scores_the_prompt_as_lm_evaluation_harness_asks(daemon: Daemon, store_dir: Path) -> None:
    """``echo`` + ``logprobs`` + ``max_tokens: 0`` (local-completions' loglikelihood request): the prompt's
    tokens with their log-probabilities, the first null; a greedy continuation scored so matches what
    generating it reported."""
    from tokenizers import Tokenizer

    from llmosd.store import ModelStore

    store = ModelStore(store_dir)
    tokenizer = Tokenizer.from_file(str(store.file_path(store.manifest(SMOLLM2), "tokenizer")))
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False).ids
    async with aiohttp.ClientSession() as s:

        async def complete(**body: Any) -> dict[str, Any]:
            async with s.post(daemon.url + "/v1/completions", json={"model": SMOLLM2, "temperature": 0, **body}) as r:
                assert r.status == 200, await r.text()
                return dict((await r.json())["choices"][0])

        generated = await complete(prompt=prompt, max_tokens=3, logprobs=1)
        continuation = tokenizer.encode(generated["text"], add_special_tokens=False).ids
        scored = await complete(prompt=prompt + continuation, max_tokens=0, echo=True, logprobs=1)
        lp = scored["logprobs"]
        assert scored["text"] == tokenizer.decode(prompt + continuation) == "".join(lp["tokens"])
        assert len(lp["tokens"]) == len(prompt) + len(continuation) and scored["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(v <= 0 for v in lp["token_logprobs"][1:])
        tail = lp["token_logprobs"][len(prompt) :]
        assert lp["tokens"][len(prompt) :] == generated["logprobs"]["tokens"]  # the same three tokens
        # Scored one position a run, generated after one prefill: the same model, but int8 compute rounds the
        # two paths' activations apart (measured: 2e-4 at the first token, 0.02-0.07 later); the exact check
        # against PyTorch is tests/test_generation.py's, at fp32.
        assert all(abs(a - b) < 0.15 for a, b in zip(tail, generated["logprobs"]["token_logprobs"], strict=True))
        async with s.post(
            daemon.url + "/v1/completions", json={"model": SMOLLM2, "prompt": "Hi", "max_tokens": 0}
        ) as r:
            assert r.status == 400 and "max_tokens" in (await r.json())["error"]["message"]  # 0 only with echo


async def test_wrong_task_and_unknown_model(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(daemon.url + "/v1/chat/completions", json={"model": DEFAULT, "messages": QUESTION}) as r:
            assert r.status == 400 and "does not generate text" in (await r.json())["error"]["message"]
        async with s.post(daemon.url + "/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
            assert r.status == 404
        async with s.post(daemon.url + "/v1/embeddings", json={"model": SMOLLM2, "input": "x"}) as r:
            assert r.status == 400 and "text-generation model" in (await r.json())["error"]["message"]
        for ids in ([999_999_999], [1, -5]):
            async with s.post(daemon.url + "/v1/completions", json={"model": SMOLLM2, "prompt": ids}) as r:
                assert r.status == 400 and "vocabulary" in (await r.json())["error"]["message"]
        async with s.get(daemon.url + f"/v1/models/{SMOLLM2}") as r:
            card = await r.json()
        assert card["task"] == "text-generation" and card["chat_template"] and card["context_length"] == 8192


async def test_a_model_that_does_not_think_takes_the_thinking_fields_and_is_unchanged(daemon: Daemon) -> None:
    """SmolLM2 does not think (its template names no think tags): its card says so, its answers carry no
    reasoning_content, and turning thinking off changes neither its prompt nor its greedy answer."""
    body = {"model": SMOLLM2, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    answers = []
    async with aiohttp.ClientSession() as s:
        async with s.get(daemon.url + f"/v1/models/{SMOLLM2}") as r:
            assert (await r.json())["reasoning"] is None
        for extra in ({}, {"reasoning_effort": "none"}, {"chat_template_kwargs": {"enable_thinking": False}}):
            async with s.post(daemon.url + "/v1/chat/completions", json=body | extra) as r:
                assert r.status == 200, await r.text()
                out = await r.json()
            assert "reasoning_content" not in out["choices"][0]["message"]
            assert "completion_tokens_details" not in out["usage"]
            answers.append((out["choices"][0]["message"]["content"], out["usage"]))
    assert answers[0] == answers[1] == answers[2]


async def status(s: aiohttp.ClientSession, daemon: Daemon) -> dict[str, Any]:
    async with s.get(daemon.url + "/api/status") as r:
        models = {m["name"]: m for m in (await r.json())["models"]}
    generation: dict[str, Any] = models[SMOLLM2]["instances"][0]["generation"]
    return generation


async def test_a_client_that_hangs_up_frees_its_row(daemon: Daemon) -> None:
    body = json.dumps(
        {"model": SMOLLM2, "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    ).encode()
    async with aiohttp.ClientSession() as s:
        before = await status(s, daemon)
        for streaming in (True, False):
            payload = body if streaming else body.replace(b'"stream": true', b'"stream": false')
            with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
                head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                if streaming:
                    seen = b""
                    while b"data: " not in seen:  # the headers, then the first token: generating
                        seen += sock.recv(4096)
                else:
                    await asyncio.sleep(1.0)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                now = await status(s, daemon)
                if now["running"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert now["running"] == 0
        after = await status(s, daemon)
        assert after["cancelled"] == before["cancelled"] + 2
        assert after["decode_tokens"] - before["decode_tokens"] < 1000  # far from 2 x 2000


def test_llmosd_client_generates_over_the_socket_and_tcp(daemon: Daemon) -> None:
    from llmosd import Client
    from llmosd.client import ApiError

    for client in (Client(socket=daemon.socket), Client(daemon.url, token=daemon.token)):
        model = client.load_model(SMOLLM2)
        question = QUESTION[0]["content"]
        text = model.generate_text(question, max_tokens=24, temperature=0)
        assert "Paris" in text
        pieces = list(model.generate_text(question, stream=True, max_tokens=24, temperature=0))
        assert "".join(pieces) == text and len(pieces) > 3
        raw = model.generate_text("The capital of France is", raw=True, max_tokens=5, temperature=0)
        assert isinstance(raw, str) and raw
        assert len(client.load_model(DEFAULT).embed(["a", "b"])) == 2
        with pytest.raises(ApiError) as err:
            client.load_model("nope")
        assert err.value.status == 404 and "not loaded" in err.value.message


async def test_deadlines_answer_504_and_free_the_row_and_priorities_are_checked(daemon: Daemon) -> None:
    body = {"model": SMOLLM2, "messages": QUESTION, "max_tokens": 500, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        before = await status(s, daemon)
        headers = {"X-Request-Timeout": "0.3", "X-Priority": "high"}
        async with s.post(daemon.url + "/v1/chat/completions", json=body, headers=headers) as r:
            err = await r.json()
        assert r.status == 504 and err["error"]["type"] == "timeout_error" and "0.3 s" in err["error"]["message"]
        _, events = await sse_events_with(s, daemon, body | {"stream": True}, headers)
        assert events[-1]["error"]["type"] == "timeout_error"  # a stream ends with an in-band error
        for _ in range(50):
            now = await status(s, daemon)
            if now["running"] == 0:
                break
            await asyncio.sleep(0.1)
        assert now["running"] == 0 and now["cancelled"] == before["cancelled"] + 2
        assert now["decode_tokens"] - before["decode_tokens"] < 400
        for bad in ({"X-Priority": "urgent"}, {"X-Request-Timeout": "soon"}, {"X-Request-Timeout": "0"}):
            async with s.post(daemon.url + "/v1/chat/completions", json=body, headers=bad) as r:
                assert r.status == 400, bad
        async with s.post(daemon.url + "/v1/embeddings", json={"model": DEFAULT, "input": "x", "priority": 3}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "priority"
        async with s.get(daemon.url + "/api/status") as r:
            models = {m["name"]: m for m in (await r.json())["models"]}
        assert models[DEFAULT]["queued_by_priority"] == {"high": 0, "normal": 0, "low": 0}


async def sse_events_with(
    s: aiohttp.ClientSession, daemon: Daemon, body: dict[str, Any], headers: dict[str, str]
) -> tuple[str, list[Any]]:
    async with s.post(daemon.url + "/v1/chat/completions", json=body, headers=headers) as r:
        raw = (await r.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    return raw, [e if e == "[DONE]" else json.loads(e) for e in events]
