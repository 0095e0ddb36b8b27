"""Benchmark long prompts: time to first token, and what a running stream feels while another request's
long prompt is prefilled (chunked prefill), llmosd beside llama.cpp's `llama-server`, in one run.

    python bench/long_context.py --llama-server PATH [--precision int4] [--rounds 2]

Three servers, each with SmolLM2-135M-Instruct, 2 threads, no prompt cache (every prompt is prefilled):
llmosd as it ships (prompts in chunks of ``prefill_chunk_tokens``, 128), llmosd with chunks of 8,192 (a
prompt runs whole, as before chunked prefill) and llama-server with its defaults (``-b 2048 -ub 512``,
two slots). Rounds alternate the servers. Per round and server:
- TTFT of prompts of 512, 2,048 and 7,000 tokens, alone (token ids, greedy, one token);
- a stream (a short prompt, 160 tokens, greedy) that, after its 10th token, has a 7,000-token prompt
  sent beside it: the stream's largest gap and its p99 gap while the prompt prefills;
- llmosd only: a 2,000-token prompt scored (``echo`` + ``logprobs``, ``max_tokens`` 0), its wall time
  (llama-server has no prompt scoring through its OpenAI API).
Peak RSS is each process's VmHWM at the end. llama.cpp is a benchmark peer only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import Daemon
from generation import MODEL, NO_PREFIX_CACHE, THREADS, LlamaServer, ensure_store
from structured import arguments

LENGTHS = (512, 2048, 7000)
LONG = 7000
STREAM_TOKENS = 160
SCORED = 2000
CONTEXT = 8192
TEXT = (
    "The harbour wall was built in 1843 from granite brought by sea, and the lighthouse beside it kept a "
    "paraffin lamp until 1921, when the keepers were given a diesel generator and a telephone line. "
)


def long_ids(state: Path, n: int) -> list[int]:
    """``n`` token ids of plain prose (numbered sentences, so no two stretches are alike)."""
    from tokenizers import Tokenizer

    from llmosd.store import ModelStore

    store = ModelStore(state)
    tokenizer = Tokenizer.from_file(str(store.file_path(store.manifest(MODEL), "tokenizer")))
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tokenizer.encode(f"{i}. {TEXT}", add_special_tokens=False).ids
        i += 1
    return ids[:n]


async def send(port: int, token: str, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    data = json.dumps({"model": MODEL, "temperature": 0, **body}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 26)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
    writer.write(head.encode() + f"\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode() + data)
    return reader, writer


async def post(port: int, token: str, body: dict[str, Any]) -> tuple[list[float], float, dict[str, Any]]:
    """One /v1/completions request: each streamed event's arrival time (or none), the start, the answer."""
    t0 = time.perf_counter()
    reader, writer = await send(port, token, body)
    stamps: list[float] = []
    answer: dict[str, Any] = {}
    if body.get("stream"):
        while line := await reader.readline():
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
            elif line.startswith(b"data: [DONE]"):
                break
    else:
        raw = await reader.read()
        answer = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        stamps.append(time.perf_counter())
    writer.close()
    return stamps, t0, answer


async def ttft(port: int, token: str, ids: list[int]) -> float:
    stamps, t0, _ = await post(port, token, {"prompt": ids, "max_tokens": 1, "stream": True, "cache_prompt": False})
    return stamps[0] - t0


async def stall(port: int, token: str, short: list[int], long: list[int]) -> list[float]:
    """The stream's gaps while the long prompt is prefilled beside it (from its sending to its answer)."""
    sent = asyncio.Event()
    window: list[float] = []

    async def other() -> None:
        await sent.wait()
        stamps, t0, _ = await post(port, token, {"prompt": long, "max_tokens": 1, "cache_prompt": False})
        window.extend([t0, stamps[-1]])

    async def stream() -> list[float]:
        body = {"prompt": short, "max_tokens": STREAM_TOKENS, "stream": True, "ignore_eos": True, "cache_prompt": False}
        data = json.dumps({"model": MODEL, "temperature": 0, **body}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
        )
        writer.write(head.encode() + f"\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode() + data)
        stamps: list[float] = []
        while line := await reader.readline():
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
                if len(stamps) == 10:
                    sent.set()
            elif line.startswith(b"data: [DONE]"):
                break
        writer.close()
        return stamps

    stamps, _ = await asyncio.gather(stream(), other())
    start, end = window
    return [b - a for a, b in itertools.pairwise(stamps) if b > start and a < end]


async def scored(port: int, token: str, ids: list[int]) -> float:
    stamps, t0, answer = await post(port, token, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert len(answer["choices"][0]["logprobs"]["token_logprobs"]) == len(ids), answer
    return stamps[-1] - t0


def measure(servers: dict[str, tuple[int, str]], state: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    prompts = {n: long_ids(state, n) for n in LENGTHS}
    short = long_ids(state, 16)
    scoring = long_ids(state, SCORED)

    async def run() -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
        for port, token in servers.values():
            await ttft(port, token, short)  # warm
        for _ in range(rounds):
            for name, (port, token) in servers.items():
                got = out[name]
                for n, ids in prompts.items():
                    got.setdefault(f"ttft {n}", []).append(await ttft(port, token, ids))
                got.setdefault("gaps", []).extend(await stall(port, token, short, prompts[LONG]))
                if name.startswith("llmosd"):
                    got.setdefault("scored", []).append(await scored(port, token, scoring))
        return out

    return asyncio.run(run())


def main() -> int:
    args = arguments(__doc__ or "", rounds=2)
    state = args.state_dir / f"long-{args.precision}"  # its own: the graph must take logits_to_keep
    ensure_store(state, args.precision, with_minilm=False)
    with tempfile.TemporaryDirectory() as work:
        a, b = Path(work, "a"), Path(work, "b")
        a.mkdir()
        b.mkdir()
        chunked = Daemon(state, a, NO_PREFIX_CACHE)
        whole = Daemon(state, b, NO_PREFIX_CACHE | {"LLMOSD_PREFILL_CHUNK_TOKENS": str(CONTEXT)})
        llama = LlamaServer(args.llama_server, 2, CONTEXT)
        chunked.start()
        whole.start()
        llama.start()
        token = (state / "token").read_text().strip()  # written at the daemon's first start
        try:
            servers = {
                "llmosd (chunks of 128)": (chunked.port, token),
                "llmosd (whole prompts)": (whole.port, token),
                "llama-server": (llama.port, ""),
            }
            results = measure(servers, state, args.rounds)
            rss = [chunked.peak_rss_mb(), whole.peak_rss_mb(), llama.peak_rss_mb()]
        finally:
            for server in (chunked, whole, llama):
                server.stop()
    print(table(results, dict(zip(results, rss, strict=True)), args.rounds))
    return 0


def table(results: dict[str, dict[str, list[float]]], rss: dict[str, float], rounds: int) -> str:
    cpu = Path("/proc/cpuinfo").read_text().split()
    flags = sorted({f for f in cpu if f.startswith(("avx512", "avx2", "amx"))})
    lines = [
        f"### bench/long_context.py — {time.strftime('%Y-%m-%d')}, {THREADS} threads each "
        f"({os.uname().machine}: {' '.join(flags)})",
        "",
        f"SmolLM2-135M-Instruct, medians of {rounds} alternating rounds; the stream's gaps while a {LONG:,}-token "
        "prompt is prefilled beside it",
        "",
        "| server | " + " | ".join(f"TTFT {n:,}" for n in LENGTHS) + " | stream gap max | p99 | "
        f"scoring {SCORED:,} tokens | peak RSS |",
        "| --- |" + " ---: |" * (len(LENGTHS) + 4),
    ]
    for name, got in results.items():
        cells = [f"{statistics.median(got[f'ttft {n}']) * 1000:,.0f} ms" for n in LENGTHS]
        gaps = got["gaps"] or [float("nan")]
        cells += [f"{max(gaps) * 1000:,.0f} ms", f"{np.percentile(gaps, 99) * 1000:,.0f} ms"]
        cells.append(f"{statistics.median(got['scored']):.1f} s" if "scored" in got else "—")
        cells.append(f"{rss[name]:.0f} MB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
