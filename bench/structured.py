"""Benchmark constrained decoding: what a JSON schema costs per token, llmosd beside llama.cpp's server.

    python bench/structured.py --llama-server PATH [--precision int4] [--rounds 3]

The same SmolLM2-135M-Instruct as bench/generation.py (llmosd: the fused graph from the Q4_1 GGUF;
llama-server: that GGUF), 2 threads each, one chat request through one client, greedy. Each server runs
the request plain and under a JSON schema (``response_format`` ``json_schema``: llmosd masks with
llguidance, llama-server with its own GBNF grammar), at 1 and 8 concurrent streams, alternating server by
server and plain / constrained burst by burst. The figure is the time per output token after the first
(TPOT: decode, the grammar's masks included, prefill not), median over streams and rounds; a constrained
answer ends where its JSON ends, a plain one runs to max_tokens (EOS ignored). Peak RSS is each
server's VmHWM. llama.cpp is a benchmark peer only, never a dependency of llmosd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import Daemon
from generation import MODEL, ROOT, THREADS, LlamaServer, ensure_store

T = TypeVar("T")
STREAMS = (1, 8)
TOKENS = 96
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "teacher", "doctor", "artist"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "role", "skills", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Invent a person who works in a hospital. Answer in JSON."}]


async def chat(port: int, token: str, body: dict[str, Any]) -> tuple[list[float], str, float]:
    """One streamed chat request: the arrival time of each content event, the text, and the start."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}"
    writer.write(head.encode() + f"\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode() + data)
    stamps: list[float] = []
    text = []
    while line := await reader.readline():
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content")
            if piece:
                stamps.append(time.perf_counter())  # greedy: a token an event, nearly always
                text.append(piece)
        elif line.startswith(b"data: [DONE]"):
            break
    writer.close()
    return stamps, "".join(text), t0


async def one(port: int, token: str, constrained: bool) -> tuple[float, int, float]:
    """(TPOT s, output events, TTFT s) of one streamed chat request."""
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    stamps, text, t0 = await chat(port, token, body)
    if constrained:
        json.loads(text)  # the answer must be the JSON it was held to
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return tpot, len(stamps), stamps[0] - t0 if stamps else float("nan")


async def measure(servers: Servers, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for port, token in servers.values():
        await one(port, token, True)  # warm: the grammar's first compile and the caches
        await one(port, token, False)
    for streams in STREAMS:
        for _ in range(rounds):
            for name, (port, token) in servers.items():
                for constrained in (False, True):
                    results = await asyncio.gather(*(one(port, token, constrained) for _ in range(streams)))
                    cell = out.setdefault((name, streams, constrained), {"tpot": [], "tokens": [], "ttft": []})
                    cell["tpot"] += [r[0] for r in results]
                    cell["tokens"] += [r[1] for r in results]
                    cell["ttft"] += [r[2] for r in results]
    return out


def arguments(doc: str, rounds: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state")
    p.add_argument("--llama-server", type=Path, required=True, help="a built llama-server binary")
    return p.parse_args()


Servers = dict[str, tuple[int, str]]  # name: (port, bearer token)


def side_by_side(
    args: argparse.Namespace, slots: int, context: int, run: Callable[[Servers], Awaitable[T]]
) -> tuple[T, dict[str, float]]:
    """llmosd serving SmolLM2 alone and llama-server on its GGUF, both up while ``run`` measures them;
    its results and each server's peak RSS."""
    state = args.state_dir / f"gen-{args.precision}-alone"
    ensure_store(state, args.precision, with_minilm=False)
    with tempfile.TemporaryDirectory() as work:
        llmosd = Daemon(state, Path(work))
        llama = LlamaServer(args.llama_server, slots, context)
        llmosd.start()
        llama.start()
        try:
            servers = {"llama-server": (llama.port, ""), "llmosd": (llmosd.port, (state / "token").read_text().strip())}
            results = asyncio.run(run(servers))
            return results, {"llmosd": llmosd.peak_rss_mb(), "llama-server": llama.peak_rss_mb()}
        finally:
            llmosd.stop()
            llama.stop()


def main() -> int:
    args = arguments(__doc__ or "", rounds=3)
    results, rss = side_by_side(args, max(STREAMS), 512, lambda servers: measure(servers, args.rounds))
    print(table(results, rss, args))
    return 0


def table(results: dict[Any, Any], rss: dict[str, float], args: argparse.Namespace) -> str:
    out = [
        f"### bench/structured.py — {time.strftime('%Y-%m-%d')}, {THREADS} threads each ({os.uname().machine})",
        "",
        f"SmolLM2-135M-Instruct, chat, greedy, up to {TOKENS} tokens; TPOT = ms per output token after the first, "
        f"median over {args.rounds} alternating rounds x streams",
        "",
        "| server | streams | plain TPOT | JSON-schema TPOT | constrained / plain | JSON tokens | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("llama-server", "llmosd"):
        for streams in STREAMS:
            plain = statistics.median(results[(name, streams, False)]["tpot"]) * 1000
            held = statistics.median(results[(name, streams, True)]["tpot"]) * 1000
            tokens = statistics.median(results[(name, streams, True)]["tokens"])
            out.append(
                f"| {name} | {streams} | {plain:.2f} ms | {held:.2f} ms | {held / plain:.2f}x | {tokens:.0f} | "
                f"{rss[name]:.0f} MB |"
            )
    ours = statistics.median(results[("llmosd", 1, True)]["tpot"])
    theirs = statistics.median(results[("llama-server", 1, True)]["tpot"])
    out += ["", f"Constrained, 1 stream: llmosd's TPOT is {ours / theirs:.2f}x llama-server's."]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
