"""Export recipes: fp16 is validated and marked CUDA-only; an artifact outside tolerance is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmosd.runtime import ProviderSelector, load
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import export, minilm_path

pytestmark = pytest.mark.slow  # every test exports a model from PyTorch


def test_fp16_is_validated_and_refused_on_a_cpu_only_box(tmp_path: Path) -> None:
    r = export(minilm_path(), "feature-extraction", "fp16", "minilm-fp16", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "models" / "minilm-fp16" / "1" / "manifest.json").read_text())
    assert manifest["devices"] == ["cuda"] and manifest["precision"] == "fp16"
    figures = manifest["validation"]["figures"]
    assert manifest["validation"]["passed"] and figures["min_cosine"] >= 0.999
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError, match="runs only on cuda"):
        load(store, store.manifest("minilm-fp16"), ProviderSelector(device="cpu"), discover().adapters())


def test_export_refuses_an_artifact_outside_tolerance(tmp_path: Path) -> None:
    r = export(minilm_path(), "feature-extraction", "int8", "strict", tmp_path, "--tolerance", "min_cosine=0.9999")
    assert r.returncode == 2
    assert "validation refused the int8 artifact: min cosine" in r.stderr
    assert not (tmp_path / "models" / "strict").exists()
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []
    r = export(tmp_path, "feature-extraction", "int8", "x", tmp_path)
    assert r.returncode == 2 and "not a Hugging Face model folder" in r.stderr
