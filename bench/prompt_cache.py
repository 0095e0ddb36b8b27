"""Benchmark prompt (prefix) caching: time to first token with and without a prefix hit, llmosd beside
llama.cpp's server (its ``cache_prompt``).

    python bench/prompt_cache.py --llama-server PATH [--precision int4] [--rounds 5]

The same SmolLM2-135M-Instruct as bench/generation.py, 2 threads each. Each round makes a new 480-token
system prompt (a round number in its first line, so nothing earlier matches it) and asks two questions
with it, one after the other, greedy, 8 tokens: the first prefills it all (cold), the second finds it
cached (llmosd: its prefix blocks, copied into the new row; llama-server: the KV its slot kept, one slot,
``cache_prompt: true``). TTFT is from sending the request to its first content event; medians over the
rounds, servers alternating round by round. llama.cpp is a benchmark peer only.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import MODEL, THREADS
from structured import Servers, arguments, chat, side_by_side

RULES = (
    "Check-in is from 3 pm and check-out by 11 am. Breakfast is served from 7 to 10 in the garden room; "
    "the pool opens at 8 and closes at 20. Parking costs 12 euros a night; the airport shuttle leaves every "
    "hour from 6 to 22. Pets are welcome in the ground-floor rooms. Late check-out costs 20 euros an hour. "
)
QUESTIONS = ("When is breakfast served?", "How much does parking cost?")


def system(round_no: int) -> str:
    return f"Session {round_no}. You are the front-desk assistant of the Harbour View hotel. " + RULES * 5


async def ttft(port: int, token: str, sys_prompt: str, question: str) -> float:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": sys_prompt}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "cache_prompt": True,  # llama-server's (its default too); llmosd caches without being asked
    }
    stamps, _, t0 = await chat(port, token, body)
    return stamps[0] - t0


async def measure(servers: Servers, rounds: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {n: {"cold": [], "hit": []} for n in servers}
    for port, token in servers.values():
        await ttft(port, token, system(-1), QUESTIONS[0])  # warm
    for r in range(rounds):
        for name, (port, token) in servers.items():
            prompt = system(r)
            out[name]["cold"].append(await ttft(port, token, prompt, QUESTIONS[0]))
            out[name]["hit"].append(await ttft(port, token, prompt, QUESTIONS[1]))
    return out


def main() -> int:
    args = arguments(__doc__ or "", rounds=5)
    results, _ = side_by_side(args, 1, 2048, lambda servers: measure(servers, args.rounds))
    lines = [
        f"### bench/prompt_cache.py — {time.strftime('%Y-%m-%d')}, {THREADS} threads each ({os.uname().machine})",
        "",
        f"SmolLM2-135M-Instruct, a 480-token system prompt, TTFT medians of {args.rounds} alternating rounds",
        "",
        "| server | cold TTFT | prefix-hit TTFT | hit / cold |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ("llama-server", "llmosd"):
        cold = statistics.median(results[name]["cold"]) * 1000
        hit = statistics.median(results[name]["hit"]) * 1000
        lines.append(f"| {name} | {cold:.0f} ms | {hit:.0f} ms | {hit / cold:.2f}x |")
    ours, theirs = (statistics.median(results[n]["hit"]) for n in ("llmosd", "llama-server"))
    lines += [
        "",
        f"Prefix hit: llmosd's TTFT is {ours / theirs:.2f}x llama-server's. Target (issue 14): hit <= 0.3x cold.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
