"""Pulling a model from Hugging Face by name (issue 34, point 5): ``llmosd pull hf.co/ORG/REPO`` and ``POST
/api/models/pull``, against a real loopback server that serves folders in the hub's routes through
``HF_ENDPOINT`` (tests/hub.py: the only fake, as there is no hub here), and against the hub's cache laid out
on disk with ``HF_HUB_OFFLINE=1``. What is downloaded is only what the recipe needs; gated, missing and
unreachable repositories and an unsupported one each give one clear message and leave the store as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmosd.hub.plan import (
    HubRef,
    UnsupportedRepository,
    choose_gguf,
    default_name,
    parse_hub_ref,
    select_files,
    task_of,
)
from llmosd.store import ModelStore
from tests.conftest import TINY_LLAMA, Daemon, copy_minilm_tokenizer, free_port, http_json, start_daemon
from tests.hub import FakeHub, serving

REPO = "test-org/Tiny-Llama-3"
# What a hub repository holds beyond what the recipe reads: other formats' copies and documents
JUNK = ("README.md", "onnx/model.onnx", "original/consolidated.00.pth", "pytorch_model.bin", "flax_model.msgpack")
NEEDED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
}


def tiny_llama(dst: Path) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA)
    LlamaForCausalLM(config).eval().save_pretrained(dst)
    GenerationConfig(bos_token_id=101, eos_token_id=102).save_pretrained(dst)
    copy_minilm_tokenizer(dst)
    for name in JUNK:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(b"not needed " * 100)
    return dst


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("hub")
    ggufs = root / "gguf"
    ggufs.mkdir()
    for quant in ("Q4_K_M", "Q8_0", "IQ2_XXS"):  # file selection only: never exported
        (ggufs / f"Tiny-{quant}.gguf").write_bytes(quant.encode() * 64)
    docs = root / "docs"
    docs.mkdir()
    (docs / "README.md").write_text("only words")
    fake = FakeHub({REPO: tiny_llama(root / "llama"), "test-org/Tiny-GGUF": ggufs, "test-org/Docs": docs})
    fake.gated.add("test-org/Gated")
    with serving(fake):
        yield fake


def _env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    # online (conftest makes the test process offline), against the fake hub
    online = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return env | online | extra


def _pull(state: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llmosd", "pull", *args, "--state-dir", str(state)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_llmosd_pull_downloads_what_the_recipe_needs_and_stores_the_model(hub: FakeHub, tmp_path: Path) -> None:
    """The CLI end to end: only the needed files cross the wire (no onnx/, original/, .bin copies), each
    with its progress line; the export is validated and stored under the repository's name, pinned to its
    commit. A second fetch downloads nothing again (the hub's cache)."""
    state, home = tmp_path / "state", tmp_path / "hf"
    hub.sent.clear()
    r = _pull(state, _env(hub, home), f"hf.co/{REPO}", "--precision", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {s.removeprefix(REPO + "/") for s in hub.sent} == NEEDED
    for name in NEEDED:
        assert name in r.stderr  # its progress line
    m = ModelStore(state).manifest("tiny-llama-3")
    assert m.task == "text-generation" and m.precision == "fp32" and m.validation["passed"]
    assert m.source["id"] == f"hf.co/{REPO}@{FakeHub.commit(hub.repos[REPO])}"
    assert "pulled hf.co/test-org/Tiny-Llama-3 as tiny-llama-3:1 (fp32)" in r.stdout
    # The next pull of the same revision downloads nothing: the hub's cache has it (the fetch alone, in
    # this process: its export would be the one above again).
    from huggingface_hub import constants

    from llmosd.hub.fetch import fetch

    hub.sent.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        assert set(fetch(parse_hub_ref(f"hf.co/{REPO}")).files) == NEEDED
    assert hub.sent == []


@pytest.fixture(scope="module")
def hub_daemon(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("hf-home")
    quiet = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_MDNS": "false"}  # an empty store
    d = start_daemon(
        tmp_path_factory.mktemp("hub-state"), tmp_path_factory.mktemp("hub-run"), env=_env(hub, home) | quiet
    )
    yield d
    d.stop()


def _post(d: Daemon, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http_json(d, path, body)


def _get(d: Daemon, path: str) -> Any:
    status, out = http_json(d, path)
    assert status == 200, out
    return out


def test_the_api_pulls_from_hugging_face_and_serves_it(hub_daemon: Daemon, hub: FakeHub) -> None:
    status, out = _post(hub_daemon, "/api/models/pull", {"ref": f"hf.co/{REPO}", "precision": "fp32", "name": "api"})
    assert status == 200, out
    assert out["name"] == "api" and out["task"] == "text-generation" and out["source"] == f"hf.co/{REPO}"
    finished = _get(hub_daemon, "/api/models/pulls")["finished"][-1]
    assert finished["status"] == "done" and finished["stage"] == "exporting"
    sizes = {name: (hub.repos[REPO] / name).stat().st_size for name in NEEDED}
    assert finished["bytes_total"] == finished["bytes_done"] == sum(sizes.values())
    assert set(finished["layers"]) == NEEDED
    status, answer = _post(hub_daemon, "/v1/completions", {"model": "api", "prompt": "hello", "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer


@pytest.mark.parametrize(
    ("ref", "code", "words"),
    [
        ("hf.co/test-org/Gated", 403, "is gated: accept its terms on huggingface.co, then set HF_TOKEN"),
        ("hf.co/test-org/Missing", 404, "no such repository (or it is private: set HF_TOKEN)"),
        (f"hf.co/{REPO}@v9", 404, "the repository has no revision 'v9'"),
        ("hf.co/test-org/Docs", 400, "neither safetensors, PyTorch nor GGUF weights"),
        ("hf.co/test-org/Tiny-GGUF:Q5_K_S", 400, "no GGUF file of quantisation Q5_K_S; the repository has: IQ2_XXS"),
        ("hf.co/test-org/../etc", 400, "the repository must be ORG/REPO"),
    ],
)
def test_a_pull_that_cannot_be_done_says_why_and_changes_nothing(
    hub_daemon: Daemon, ref: str, code: int, words: str
) -> None:
    before = sorted(p.name for p in (hub_daemon.state_dir / "models").glob("*"))
    status, out = _post(hub_daemon, "/api/models/pull", {"ref": ref})
    assert status == code and words in out["error"]["message"], out
    assert sorted(p.name for p in (hub_daemon.state_dir / "models").glob("*")) == before


def test_an_unreachable_hub_is_a_502(tmp_path: Path) -> None:
    """Nothing listens on the endpoint: the CLI says so in one line, and the store stays empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}
    r = _pull(tmp_path / "state", env, f"hf.co/{REPO}")
    assert r.returncode == 1 and "cannot reach the hub at http://127.0.0.1:" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state" / "models").exists() or not any((tmp_path / "state" / "models").iterdir())


def test_one_gguf_file_of_a_gguf_repository(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``:QUANT`` takes that file alone; without it, Ollama's Q4_K_M."""
    from huggingface_hub import constants

    from llmosd.hub.fetch import fetch

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for quant, name in (("Q8_0", "Tiny-Q8_0.gguf"), (None, "Tiny-Q4_K_M.gguf")):
        hub.sent.clear()
        seen: list[tuple[str, int, int]] = []
        got = fetch(HubRef("test-org/Tiny-GGUF", quant=quant), lambda *a, seen=seen: seen.append(a))
        assert got.files == [name] and hub.sent == [f"test-org/Tiny-GGUF/{name}"]
        assert (got.folder / name).read_bytes() == (hub.repos["test-org/Tiny-GGUF"] / name).read_bytes()
        assert seen[-1] == (name, got.size, got.size)


def test_offline_the_hubs_cache_on_disk_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 with the cache laid out as huggingface_hub lays it (refs/main naming a snapshot):
    the files come from there, chosen as online; a repository not in the cache says so."""
    from huggingface_hub import constants

    from llmosd.hub.fetch import HubError, fetch

    cache, commit = tmp_path / "cache", "a" * 40
    repo = cache / "models--test-org--Cached"
    snapshot = repo / "snapshots" / commit
    tiny = tmp_path / "src"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tiny / "model.safetensors").write_bytes(b"\0" * 64)
    copy_minilm_tokenizer(tiny)
    (tiny / "onnx").mkdir()
    (tiny / "onnx" / "model.onnx").write_bytes(b"x")
    shutil.copytree(tiny, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    got = fetch(HubRef("test-org/Cached"))
    assert got.commit == commit and got.folder == snapshot
    assert set(got.files) == {"config.json", "model.safetensors", *NEEDED} - {"generation_config.json"}
    with pytest.raises(HubError, match=r"not in the hub's cache .* and HF_HUB_OFFLINE is set") as caught:
        fetch(HubRef("test-org/Elsewhere"))
    assert caught.value.status == 404


# The plan alone: references, files, tasks, names (no network).


def test_references_as_ollama_takes_them() -> None:
    assert parse_hub_ref("hf.co/Qwen/Qwen3-0.6B") == HubRef("Qwen/Qwen3-0.6B")
    assert parse_hub_ref("huggingface.co/org/repo@v1.0") == HubRef("org/repo", "v1.0")
    assert parse_hub_ref("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M").quant == "Q4_K_M"
    assert str(parse_hub_ref("https://huggingface.co/a/b@dev:Q8_0")) == "hf.co/a/b@dev:Q8_0"
    for bad in ("hf.co/just-one", "hf.co/a/b/c", "hf.co/a/../b", "hf.co/a/b@..", "hf.co/a/b:Q4 K", "ollama/llama3"):
        with pytest.raises(ValueError):
            parse_hub_ref(bad)


def test_the_files_a_recipe_needs() -> None:
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    files += ["config.json", "tokenizer.json", "merges.txt", "README.md", "onnx/model.onnx", "original/params.json"]
    files += ["1_Pooling/config.json", "modules.json", "pytorch_model.bin", "model-Q4_K_M.gguf"]
    assert select_files(files, None) == sorted(
        set(files) - {"README.md", "onnx/model.onnx", "original/params.json", "pytorch_model.bin", "model-Q4_K_M.gguf"}
    )
    assert select_files(files, "Q4_K_M") == ["model-Q4_K_M.gguf"]
    assert select_files(["config.json", "pytorch_model.bin"], None) == ["config.json", "pytorch_model.bin"]
    with pytest.raises(UnsupportedRepository, match=r"no config\.json"):
        select_files(["model.safetensors"], None)
    with pytest.raises(UnsupportedRepository, match="split GGUF"):
        choose_gguf(["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"], None)
    assert choose_gguf(["only.gguf"], None) == "only.gguf"
    assert choose_gguf(["a/m-Q4_K_M.gguf", "m-q4_k_m.gguf"], "Q4_K_M") == "m-q4_k_m.gguf"  # top level first


def test_the_task_and_name_come_from_the_checkpoint() -> None:
    assert task_of({"architectures": ["Qwen3ForCausalLM"]}, ["config.json"]) == "text-generation"
    assert task_of({"architectures": ["Gemma3ForConditionalGeneration"]}, []) == "text-generation"
    assert task_of({"architectures": ["BertModel"]}, ["modules.json"]) == "feature-extraction"
    assert (
        task_of({"architectures": ["XLMRobertaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}, [])
        == "text-ranking"
    )
    assert (
        task_of({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}, [])
        == "text-classification"
    )
    with pytest.raises(UnsupportedRepository, match="pass --task"):
        task_of({"architectures": ["WhisperForAudioClassification"]}, [])
    assert default_name(HubRef("Qwen/Qwen3-0.6B")) == "qwen3-0.6b"
    assert (
        default_name(HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF", quant="Q4_K_M")) == "llama-3.2-1b-instruct-q4_k_m"
    )
