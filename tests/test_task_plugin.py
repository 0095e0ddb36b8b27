"""Tasks are plugins: a third-party package (tests/data/token_task) adds token classification to llmosd
without touching llmosd's code. Its wheel is built here, installed with pip into a venv layered on the
test venv (the test venv itself stays as it was), and the installed package is what ``llmosd export``
and ``llmosd serve`` find through the ``llmosd.tasks`` entry points: the export is validated against
PyTorch by the package's own reference, and the daemon serves its route, lists it and counts it."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TINY_BERT, Daemon, copy_minilm_tokenizer, start_daemon

pytestmark = pytest.mark.slow
PLUGIN = Path(__file__).parent / "data" / "token_task"
TASK = "token-classification"
LABELS = {0: "O", 1: "B-ENT", 2: "I-ENT"}
TEXTS = ["Ada Lovelace wrote the first program.", "llmosd serves models on the box"]
QUIET = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_MDNS": "false"}


def make_tiny_tagger(dst: Path) -> Path:
    """A tiny random BertForTokenClassification with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(2)
    config = BertConfig(**TINY_BERT, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    BertForTokenClassification(config).eval().save_pretrained(dst)
    copy_minilm_tokenizer(dst)
    return dst


def layered_venv(root: Path) -> Path:
    """A venv that sees the test venv's packages (a .pth that adds its site-packages) but installs
    into its own: what pip puts there stays there. Returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # site.addsitedir, not a bare path: the test venv's own .pth files (llmosd's editable install) count too
    (Path(site) / "test-venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return python


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {}))
    )


def request(d: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("localhost", timeout=60)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(d.socket))
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read()
    return response.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw.decode()


def pytorch_scores(src: Path, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The tagger's label scores for one text's tokens, special tokens left out, and their spans."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertForTokenClassification

    enc = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text)
    model = BertForTokenClassification.from_pretrained(str(src)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.ids]), attention_mask=torch.tensor([enc.attention_mask])).logits
    scores = torch.softmax(logits[0], -1).numpy()
    keep = [i for i, s in enumerate(enc.special_tokens_mask) if not s]
    return scores[keep], [enc.offsets[i] for i in keep]


def test_a_task_package_installed_beside_llmosd_is_exported_and_served(tmp_path: Path) -> None:
    src = make_tiny_tagger(tmp_path / "tagger")
    state = tmp_path / "state"
    # Without the package, llmosd knows no such task.
    plain = run(sys.executable, "-m", "llmosd", "export", src, "--task", TASK, "--name", "t", "--state-dir", state)
    assert plain.returncode == 2 and f"unknown task {TASK!r}" in plain.stderr, plain.stderr

    shutil.copytree(PLUGIN, tmp_path / "pkg")  # a build writes into its source tree: not into the checkout
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        tmp_path / "pkg",
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("llmosd_token_task-*.whl"))
    python = layered_venv(tmp_path / "venv")
    installed = run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    assert installed.returncode == 0, installed.stderr
    assert run(sys.executable, "-c", "import llmosd_token_task").returncode != 0  # the test venv is untouched

    exported = run(
        python,
        "-m",
        "llmosd",
        "export",
        src,
        "--task",
        TASK,
        "--precision",
        "fp32",
        "--name",
        "tagger",
        "--state-dir",
        state,
    )
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((state / "models" / "tagger" / "1" / "manifest.json").read_text())
    assert manifest["task"] == TASK and manifest["runtime"]["labels"] == list(LABELS.values())
    figures = manifest["validation"]["figures"]
    assert figures["max_abs_diff"] <= 1e-4 and figures["batch_invariance_max_abs_diff"] <= 1e-5, figures

    d = start_daemon(state, tmp_path, env=QUIET, python=str(python))
    try:
        status, body = request(d, "POST", "/v1/token-classification", {"model": "tagger", "input": TEXTS})
        assert status == 200, body
        assert [x["index"] for x in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] > 0
        for text, answer in zip(TEXTS, body["data"], strict=True):
            scores, spans = pytorch_scores(src, text)
            tokens = answer["tokens"]
            assert [(t["start"], t["end"]) for t in tokens] == spans
            assert [t["text"] for t in tokens] == [text[s:e] for s, e in spans]
            assert [t["label"] for t in tokens] == [LABELS[int(i)] for i in scores.argmax(-1)]
            assert np.allclose([t["score"] for t in tokens], scores.max(-1), atol=1e-4)
        # bad input is the package's 400, through llmosd's own request parsing; an unknown model a 404
        status, bad = request(d, "POST", "/v1/token-classification", {"model": "tagger", "input": []})
        assert status == 400 and bad["error"]["param"] == "input", bad
        status, _ = request(d, "POST", "/v1/token-classification", {"model": "nobody", "input": "x"})
        assert status == 404
        # listed, described, documented and counted like a built-in task
        _, tasks = request(d, "GET", "/api/tasks")
        mine = next(t for t in tasks["tasks"] if t["name"] == TASK)
        assert mine["package"] == "llmosd-token-task" and mine["routes"] == ["POST /v1/token-classification"]
        assert {t["name"] for t in tasks["tasks"]} >= {"feature-extraction", "text-generation", TASK}
        _, card = request(d, "GET", "/v1/models/tagger")
        assert card["task"] == TASK and card["labels"] == list(LABELS.values())
        _, spec = request(d, "GET", "/openapi.json")
        assert "post" in spec["paths"]["/v1/token-classification"]
        _, metrics = request(d, "GET", "/metrics")
        assert f'llmosd_task_requests_total{{status="200",task="{TASK}"}} ' in metrics
        _, meta = request(d, "GET", "/v2/models/tagger")  # the Open Inference Protocol serves its tensors too
        assert {t["name"] for t in meta["inputs"]} >= {"input_ids", "attention_mask"}
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]

    # The same store under the test venv, which lacks the package: the model stays in the store, and the
    # daemon runs and says which task is missing (not ready: the store's only model cannot be served).
    d = start_daemon(state, tmp_path, env=QUIET, until="/healthz")
    try:
        missing = f"no installed task serves {TASK!r}"
        status, body = request(d, "GET", "/readyz")
        assert status == 503 and missing in body["error"]["message"], body
        status, body = request(d, "GET", "/v1/models/tagger")
        assert status == 503 and missing in body["error"]["message"], body
        status, _ = request(d, "POST", "/v1/token-classification", {"model": "tagger", "input": "x"})
        assert status == 404  # no such route here
        assert (state / "models" / "tagger" / "1" / "manifest.json").is_file()
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
