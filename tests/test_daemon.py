"""The daemon as a process: first start, serving path, shutdown, sockets, integrity, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DEFAULT, SENTENCES, SMOLLM2, Daemon, free_port, llmosd, start_daemon

SERVE_AND_REPORT = textwrap.dedent("""
    import asyncio, importlib.util, json, os, signal, sys
    import aiohttp
    from llmosd.config import load_config
    from llmosd.daemon import serve

    async def main():
        cfg = load_config({"state_dir": sys.argv[1], "socket": sys.argv[2], "host": "none"}, {})
        task = asyncio.create_task(serve(cfg))
        while True:
            await asyncio.sleep(0.2)
            try:
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sys.argv[2])) as s:
                    async with s.get("http://x/readyz") as r:
                        if r.status == 200:
                            break
            except OSError:
                pass
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sys.argv[2])) as s:
            async with s.post("http://x/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"}) as r:
                embedded = r.status
            chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4, "ignore_eos": True}
            async with s.post("http://x/v1/chat/completions", json=chat) as r:
                answered = (await r.json())["usage"]["completion_tokens"] if r.status == 200 else r.status
        # the README's first Python example, as a newcomer runs it (no sampling fields, no max_tokens)
        from llmosd import Client
        def readme():
            model = Client(socket=sys.argv[2]).load_model("smollm2-135m-instruct")
            return model.generate_text("What is the capital of France?")
        answers = [await asyncio.to_thread(readme) for _ in range(5)]
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sys.argv[2])) as s:
            async with s.get("http://x/api/models/smollm2-135m-instruct") as r:
                sampling = (await r.json())["sampling"]["defaults"]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum"))
        installed = importlib.util.find_spec("torch") is not None  # top-level lookup: imports nothing
        print(json.dumps({"heavy": heavy, "export_extra_installed": installed, "embedded": embedded,
                          "answered": answered, "answers": answers, "sampling": sampling}))
        os.kill(os.getpid(), signal.SIGTERM)
        print(json.dumps({"exit": await task}))

    asyncio.run(main())
""")


@pytest.mark.slow  # the first start exports both default models
def test_first_start_seeds_the_default_models_and_never_imports_torch(tmp_path: Path) -> None:
    """`make run` on an empty store: MiniLM and SmolLM2 exported in child processes, then served; torch
    stays out of the daemon."""
    state, sock = tmp_path / "state", tmp_path / "s.sock"
    r = subprocess.run(
        [sys.executable, "-c", SERVE_AND_REPORT, str(state), str(sock)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines[0]["heavy"] == [] and lines[0]["export_extra_installed"]  # installed, yet never imported
    assert lines[0]["embedded"] == 200 and lines[0]["answered"] == 4
    # SmolLM2's recipe defaults (model card + Ollama's repeat penalty) take the absent fields: answers end
    # by themselves, short of the 1,024-token default limit, and do not loop. (What it says is the
    # model's: its first token here is a near tie even in fp32, "The" 0.152 against "L" 0.140.)
    assert lines[0]["sampling"] == {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}

    # A 135M model at temperature 0.2 still rambles now and then: of 64 answers to this question at these
    # defaults, int4 gave none over 300 words (4 over 150), int8 2 (bench stores, in process); through a
    # daemon (int4, 2026-12-02) none of 60, and one of 30 asked while a first start tunes (613 words,
    # looping). A fresh-clone CI run drew two long answers of three, one looping ("Zhilina, zhilina..."),
    # though greedy answers asked during a calibration match those asked without. So five answers, of
    # which three must end by themselves, short and without a loop: at a 3 % rate of bad answers a false
    # alarm comes about three times in ten thousand runs; a broken sampler or stop condition fails always.
    def bad(answer: str) -> bool:
        words = answer.split()
        grams = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
        looping = bool(grams) and max(grams.count(g) for g in grams) > 3  # "la France, la France, ..."
        return not words or len(words) >= 300 or looping

    answers = lines[0]["answers"]
    assert len(answers) == 5 and sum(map(bad, answers)) <= 2, answers
    assert lines[1]["exit"] == 0
    manifest = json.loads((state / "models" / DEFAULT / "1" / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["validation"]["passed"]
    assert manifest["validation"]["figures"]["min_cosine"] >= 0.97
    smol = json.loads((state / "models" / "smollm2-135m-instruct" / "1" / "manifest.json").read_text())
    assert smol["task"] == "text-generation" and smol["validation"]["passed"]
    assert smol["precision"] == "int4"  # "auto": the fastest that passes (its Q4_1 blocks, carried)
    assert not sock.exists()  # removed on shutdown
    assert stat.S_IMODE((state / "token").stat().st_mode) == 0o600


def test_sigterm_drains_in_flight_requests(store_dir: Path, tmp_path: Path) -> None:
    d = start_daemon(store_dir, tmp_path)

    async def burst() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.socket), limit=0)) as s:

            async def one(text: str) -> int:
                async with s.post("http://x/v1/embeddings", json={"model": "minilm-fp32", "input": [text] * 16}) as r:
                    await r.read()
                    return r.status

            async def received() -> int:
                async with s.get("http://x/api/status") as r:
                    models = {m["name"]: m for m in (await r.json())["models"]}
                fp32 = models.get("minilm-fp32", {"instances": []})  # not loaded yet: nothing received
                return sum(int(i["batcher"]["requests"]) for i in fp32["instances"])

            before = await received()
            tasks = [asyncio.create_task(one(t)) for t in SENTENCES[:24]]
            for _ in range(600):  # until the daemon holds all 24 (a fixed sleep raced a loaded box)
                if await received() - before == 24:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the daemon never held all 24 requests")
            d.proc.terminate()
            return await asyncio.gather(*tasks)

    statuses = asyncio.run(burst())
    assert d.proc.wait(30) == 0
    assert statuses == [200] * 24
    assert not d.socket.exists()
    assert "stopping: refusing new connections" in d.log.read_text()


def test_socket_file_rules(store_dir: Path, tmp_path: Path) -> None:
    sock = tmp_path / "llmosd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a crashed daemon's leftover: a socket file nobody accepts on
    d = start_daemon(store_dir, tmp_path)
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        # A second daemon must not steal a live socket.
        r = llmosd(
            "serve", "--state-dir", str(store_dir), "--socket", str(sock), "--port", str(free_port()), timeout=60
        )
        assert r.returncode == 2 and "another process is listening" in r.stderr
    finally:
        assert d.stop() == 0
    not_a_socket = tmp_path / "plain"
    not_a_socket.write_text("keep me")
    r = llmosd("serve", "--state-dir", str(store_dir), "--socket", str(not_a_socket), "--port", "0", timeout=60)
    assert r.returncode == 2 and "is not a socket" in r.stderr and not_a_socket.read_text() == "keep me"


def test_corrupt_blob_is_refused_and_named(store_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    for name in ("minilm-fp32", DEFAULT, SMOLLM2):
        shutil.rmtree(state / "models" / name)
    manifest = json.loads((state / "models" / "tiny-clf" / "1" / "manifest.json").read_text())
    digest = next(f["digest"] for f in manifest["files"] if f["role"] == "model")
    blob = state / "blobs" / "sha256" / digest.removeprefix("sha256:")
    os.chmod(blob, 0o644)
    with blob.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmosd", "serve", "--state-dir", str(state), "--socket", str(sock), "--host", "none"],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, LLMOSD_SEED_DEFAULTS="false"),
    )
    try:
        deadline = time.monotonic() + 60
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            r = llmosd("status", "--socket", str(sock), "--json", timeout=30)
            if r.returncode == 0:
                status = json.loads(r.stdout)
                if "corrupt" in str(status["status"]):
                    break
            time.sleep(0.3)
        assert status["ready"] is False
        assert "serving 0 model(s)" in str(status["status"])
        assert "tiny-clf: tiny-clf:1: file model.onnx is corrupt" in str(status["status"])
        assert status["models"] == []
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_manifests_record_validation_figures(store_dir: Path) -> None:
    r = llmosd("models", "list", "--json", "--state-dir", str(store_dir))
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows[DEFAULT]["precision"] == "int8" and rows["minilm-fp32"]["precision"] == "fp32"
    for name, key, bound in (
        ("minilm-fp32", "min_cosine", 0.9999),
        (DEFAULT, "mean_cosine", 0.985),
        ("tiny-clf", "label_agreement", 1.0),
    ):
        shown = json.loads(llmosd("models", "show", name, "--state-dir", str(store_dir)).stdout)
        assert shown["validation"]["passed"] and shown["validation"]["figures"][key] >= bound
        assert shown["recipe"]["steps"]["optimize"]["fusions"]  # attention etc. were fused
        assert shown["source"]["id"] and shown["inputs"][0]["name"] == "input_ids"


def test_cli_status_and_rm(daemon: Daemon, store_dir: Path, tmp_path: Path) -> None:
    r = llmosd("status", "--socket", str(daemon.socket))
    assert r.returncode == 0 and "serving 4 model(s) on cpu" in r.stdout and "minilm-fp32:1" in r.stdout
    assert f"{SMOLLM2}:1 text-generation int4 on cpu" in r.stdout and "tokens decoded" in r.stdout
    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    before = len(list((state / "blobs" / "sha256").iterdir()))
    r = llmosd("models", "rm", "tiny-clf", "--state-dir", str(state))
    assert r.returncode == 0 and "removed tiny-clf" in r.stdout
    # Its model and config go; its tokenizer.json is MiniLM's very bytes, one shared blob, which stays.
    assert len(list((state / "blobs" / "sha256").iterdir())) == before - 2
    r = llmosd("models", "rm", "../x", "--state-dir", str(state))
    assert r.returncode == 2 and "invalid model name" in r.stderr
