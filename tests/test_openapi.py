"""The OpenAPI document is complete and true: schemathesis (its own CLI, as a user would run it) drives a
real daemon serving the real models for a bounded time, with the checks that the spec's statuses,
content types and response schemas are what the daemon answers, and that nothing is a server error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DEFAULT, SMOLLM2, start_daemon, store_with

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# Not fuzzed: a pull would send the daemon to whatever registry host the fuzzer invents (this machine
# reaches no network, and a test must not try), and each tune call runs seconds of calibration.
EXCLUDED = ("/api/models/pull", "/api/models/{name}/tune")


def test_schemathesis_finds_nothing_against_a_real_daemon(store_dir: Path, tmp_path: Path) -> None:
    store = store_with(store_dir, tmp_path / "store", (DEFAULT, SMOLLM2))
    env = {
        "LLMOSD_SEED_DEFAULTS": "false",
        "LLMOSD_MDNS": "false",
        "LLMOSD_AUTOTUNE": "false",
        "LLMOSD_DEFAULT_MAX_TOKENS": "8",  # a generated request that names no max_tokens stays short
    }
    d = start_daemon(store, tmp_path, env=env)
    report = tmp_path / "report"
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{d.url}/openapi.json",
                "--checks",
                CHECKS,
                *(arg for path in EXCLUDED for arg in ("--exclude-path", path)),
                "--workers",
                "2",
                "--max-time",
                "90",
                "--seed",
                "12",
                "--report",
                "json",
                "--report-dir",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
            env=dict(
                os.environ,
                SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
                PYTHONPATH=str(Path(__file__).parent.parent),
                LLMOSD_FUZZ_MODELS=f"{DEFAULT},{SMOLLM2}",
            ),
        )
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    results = json.loads(next(report.glob("*.json")).read_text())
    cases = results["test_cases"]
    assert run.returncode == 0 and cases["with_failures"] == 0 and not results["errors"], run.stdout[-6000:]
    assert cases["generated"] >= 1000, cases
    assert "internal error in" not in d.log.read_text()  # no handler raised (the errors middleware logs it)
