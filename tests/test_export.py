"""Export recipes beyond the shared session store: fp16 is exported, validated, and marked CUDA-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmosd.runtime import ProviderSelector, load
from llmosd.store import ModelStore
from tests.conftest import llmosd, minilm_path


def test_fp16_is_validated_and_refused_on_a_cpu_only_box(tmp_path: Path) -> None:
    r = llmosd(
        "export",
        str(minilm_path()),
        "--task",
        "feature-extraction",
        "--precision",
        "fp16",
        "--name",
        "minilm-fp16",
        "--state-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "models" / "minilm-fp16" / "1" / "manifest.json").read_text())
    assert manifest["devices"] == ["cuda"] and manifest["precision"] == "fp16"
    figures = manifest["validation"]["figures"]
    assert manifest["validation"]["passed"] and figures["min_cosine"] >= 0.999
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError, match="runs only on cuda"):
        load(store, store.manifest("minilm-fp16"), ProviderSelector(device="cpu"))
