"""The OpenAPI document is complete and true: schemathesis (its own CLI, as a user would run it) drives a
real daemon serving the real models for a bounded time, with the checks that the spec's statuses,
content types and response schemas are what the daemon answers, that nothing is a server error, and that
what the document calls valid is accepted (it is as strict as the daemon's validation).
Meanwhile the model is retuned 50 times, and the daemon's memory must come back to where it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import DEFAULT, SMOLLM2, Daemon, start_daemon, store_with, unix_json

# Every case: no 5xx, the statuses, content types and bodies the document states, Allow on 405s; a case
# the document calls valid is accepted (2xx, or 401/403/404/409/429), except /v2 inference, whose tensors
# must match the model's own inputs, which no OpenAPI document can state.
CONFIG = """
[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true
allow_header_conformance.enabled = true
positive_data_acceptance.enabled = true

[[operations]]
include-path-regex = "/infer$"
checks.positive_data_acceptance.enabled = false
"""
# Not fuzzed: a pull would send the daemon to whatever registry host the fuzzer invents (this machine
# reaches no network, and a test must not try), and each tune call runs seconds of calibration.
EXCLUDED = ("/api/models/pull", "/api/models/{name}/tune")
MIN_TUNES, MAX_TUNES = 12, 50


def test_schemathesis_finds_nothing_against_a_real_daemon(store_dir: Path, tmp_path: Path) -> None:
    store = store_with(store_dir, tmp_path / "store", (DEFAULT, SMOLLM2, "tiny-clf"))
    env = {
        "LLMOSD_SEED_DEFAULTS": "false",
        "LLMOSD_MDNS": "false",
        "LLMOSD_AUTOTUNE": "false",
        "LLMOSD_DEFAULT_MAX_TOKENS": "8",  # a generated request that names no max_tokens stays short
    }
    d = start_daemon(store, tmp_path, env=env)
    report = tmp_path / "report"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    try:
        baseline = settled_rss(d)
        fuzz_log = (tmp_path / "fuzz.log").open("w")
        fuzz = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(config),
                "run",
                f"{d.url}/openapi.json",
                *(arg for path in EXCLUDED for arg in ("--exclude-path", path)),
                # One worker: CPython 3.11 before 3.11.8 races building ASTs in two threads (gh-106905), and
                # hypothesis parses strategies' source as it generates: "SystemError: AST constructor
                # recursion depth mismatch" struck once in two runs here with two workers.
                "--workers",
                "1",
                "--max-time",
                "180",  # valid cases reach the models now: about 700 in 90 s in a full CI run, 1,000 are asked
                "--seed",
                "12",
                "--report",
                "json",
                "--report-dir",
                str(report),
            ],
            stdout=fuzz_log,  # a file, not a pipe: nothing reads it while the test tunes
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            env=dict(
                os.environ,
                SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
                PYTHONPATH=str(Path(__file__).parent.parent),
                LLMOSD_FUZZ_MODELS=f"{DEFAULT}:feature-extraction,{SMOLLM2}:text-generation,tiny-clf:text-classification",
            ),
        )
        # Calibrations amid the fuzzer's traffic, each of batches far larger than the traffic's, then a few
        # more once it is done (a MiniLM calibration takes about 11 s here, SmolLM2's 2).
        tunes = 0
        while tunes < MAX_TUNES and (fuzz.poll() is None or tunes < MIN_TUNES):
            unix_json(d, f"/api/models/{(DEFAULT, SMOLLM2)[tunes % 2]}/tune", {})
            tunes += 1
        fuzz.wait(timeout=360)
        fuzz_log.close()
        output = (tmp_path / "fuzz.log").read_text()
        after = settled_rss(d)
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    results = json.loads(next(report.glob("*.json")).read_text())
    cases = results["test_cases"]
    assert fuzz.returncode == 0 and cases["with_failures"] == 0 and not results["errors"], output[-6000:]
    assert cases["generated"] >= 1000, cases
    # Whatever the tuning and the fuzzing held (ORT's arenas, the C heap) was given back once idle.
    assert after <= 1.10 * baseline, f"RSS {baseline >> 20} MB before, {after >> 20} MB after"
    assert "internal error in" not in d.log.read_text()  # no handler raised (the errors middleware logs it)


def settled_rss(d: Daemon) -> int:
    """The daemon's resident memory once it has served each model and been idle past the workers'
    release delay (runtime.memory.IDLE_RELEASE_S, 2 s)."""
    unix_json(d, "/v1/embeddings", {"model": DEFAULT, "input": ["warm", "a second input"]})
    unix_json(d, "/v1/completions", {"model": SMOLLM2, "prompt": "Hello", "max_tokens": 4})
    time.sleep(4)
    rss: int = psutil.Process(d.proc.pid).memory_info().rss
    return rss
