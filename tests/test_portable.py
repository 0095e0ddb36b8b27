"""Artifacts travel between CPUs (llmosd.scheduler.portable): the manifest records the CPU kernels its gate
ran on and the gate's reference data; a box whose kernels differ runs the gate's short form before the
version serves, keeps the result beside the artifact, and refuses a version that fails it.

Only one CPU is here, so "exported elsewhere" is a copy of SmolLM2's version whose manifest names
other kernels (what an artifact exported on another box and synced here carries); the short form then
really runs on this box's kernels, against PyTorch's recorded next tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmosd.hardware.cpu import probe_cpu
from llmosd.runtime import ProviderSelector, load
from llmosd.scheduler.portable import check_portable, validated_elsewhere
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import SMOLLM2, start_daemon, store_with

pytestmark = pytest.mark.slow


def other_kernels() -> dict[str, Any]:
    here = probe_cpu()
    kernels = ["avx2"] if here.kernels != ("avx2",) else ["avx2", "avx512"]
    return {"arch": here.arch, "kernels": kernels, "model": "another box"}


def edit_version(state: Path, version: str, change: dict[str, Any], as_version: str | None = None) -> None:
    """Rewrite a stored version's validation (into a new version folder if ``as_version``)."""
    folder = state / "models" / SMOLLM2 / version
    if as_version is not None:
        shutil.copytree(folder, folder.parent / as_version)
        folder = folder.parent / as_version
    raw = json.loads((folder / "manifest.json").read_text())
    raw["validation"] |= change
    raw["version"] = as_version or version
    (folder / "manifest.json").write_text(json.dumps(raw))


def test_an_artifact_validated_on_other_kernels_is_rechecked_here_once(store_dir: Path, tmp_path: Path) -> None:
    here = probe_cpu()
    exported = ModelStore(store_dir).manifest(SMOLLM2)
    made = exported.validation["cpu"]
    assert (made["arch"], made["kernels"]) == (here.arch, list(here.kernels))  # the gate ran here
    reference = exported.validation["recheck"]
    assert len(reference["positions"]) == len(reference["top1"]) > 40 and len(reference["ids"]) == 64
    assert not validated_elsewhere(exported, here)

    state = store_with(store_dir, tmp_path / "state", (SMOLLM2,))
    edit_version(state, exported.version, {"cpu": other_kernels()})
    store = ModelStore(state)
    manifest = store.manifest(SMOLLM2)
    assert validated_elsewhere(manifest, here)
    loaded = load(store, manifest, ProviderSelector("cpu", 2, False), discover().adapters(), max_sequences=2)
    result = check_portable(loaded, here, store)
    assert result is not None and result["passed"], result
    figures = result["figures"]
    assert figures["top1_agreement"] >= exported.validation["tolerance"]["top1_agreement"]
    if figures["batch_invariance"]["lone_row"] == "alone":
        # the kernels really are the gate's, and a lone row runs as the gate ran it: the same figure
        assert figures["top1_agreement"] == exported.validation["figures"]["top1_agreement"]
    assert figures["positions"] == len(reference["positions"])
    assert figures["batch_invariance"]["exact"] is True
    kept = list((state / "checks").rglob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == result  # beside the artifact
    # a second load reads what was kept: the short form runs once per artifact and CPU
    again = load(store, manifest, ProviderSelector("cpu", 2, False), discover().adapters(), max_sequences=2)

    def ran_again(reference: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the short form ran again")

    again.backend.recheck = ran_again  # type: ignore[union-attr]
    assert check_portable(again, here, store) == result
    assert again.backend.rechecked == result  # type: ignore[union-attr]  # shown in the model's status


def test_a_version_that_fails_the_short_form_here_is_refused_and_the_active_one_stays(
    store_dir: Path, tmp_path: Path
) -> None:
    exported = ModelStore(store_dir).manifest(SMOLLM2)
    state = store_with(store_dir, tmp_path / "state", (SMOLLM2,))
    reference = dict(exported.validation["recheck"])
    reference["top1"] = [(t + 1) % 49152 for t in reference["top1"]]  # a box whose kernels disagree everywhere
    edit_version(state, exported.version, {"cpu": other_kernels(), "recheck": reference}, as_version="9")
    env = {"LLMOSD_MDNS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false"}
    d = start_daemon(state, tmp_path, env=env)
    try:
        import http.client
        import socket

        conn = http.client.HTTPConnection("localhost", timeout=120)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(d.socket))
        body = json.dumps({"version": "9"})
        conn.request("POST", f"/api/models/{SMOLLM2}/activate", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 409, error
        assert "was validated on" in error["message"] and "below the gate's 0.95" in error["message"]
        assert ModelStore(state).active_version(SMOLLM2) == exported.version  # nothing changed
        kept = [json.loads(p.read_text()) for p in (state / "checks").rglob("*.json")]
        assert len(kept) == 1 and kept[0]["passed"] is False and kept[0]["figures"]["top1_agreement"] < 0.1
    finally:
        assert d.stop() == 0
