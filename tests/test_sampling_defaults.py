"""A model's default sampling: from its generation_config.json or the recipe at export, set per model
with `llmosd models set` (Ollama's Modelfile PARAMETER), shown in /api/models/{name}, and taken by
every request field that is absent."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMOLLM2, Daemon, export, llmosd, start_daemon, store_with, unix_json
from tests.test_export_generation import tiny_causal_lm


@pytest.mark.slow  # exports SmolLM2
def test_an_export_keeps_the_models_own_sampling_and_the_recipes(tmp_path: Path) -> None:
    src = tiny_causal_lm("llama", tmp_path / "src")
    gen = json.loads((src / "generation_config.json").read_text())
    gen |= {"do_sample": True, "temperature": 0.6, "top_p": 0.9}  # as Llama 3 ships it
    (src / "generation_config.json").write_text(json.dumps(gen))
    state = tmp_path / "state"
    r = export(src, "text-generation", "fp32", "tiny", state, "--sampling", "top_k=20")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((state / "models" / "tiny" / "1" / "manifest.json").read_text())
    assert m["runtime"]["sampling"] == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    r = export(src, "text-generation", "fp32", "tiny", state, "--sampling", "temperature=9")
    assert r.returncode != 0 and "temperature must be a number in [0.0, 2.0]" in r.stderr


def _post(d: Daemon, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(d.socket))
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_models_set_changes_the_defaults_of_absent_fields_at_once(store_dir: Path, tmp_path: Path) -> None:
    state = store_with(store_dir, tmp_path / "state", (SMOLLM2,))
    d = start_daemon(state, tmp_path)
    chat = {"model": SMOLLM2, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24}
    try:
        assert unix_json(d, f"/api/models/{SMOLLM2}")["sampling"]["defaults"] == {}  # exported without any
        r = llmosd(
            "models", "set", SMOLLM2, "temperature=0", "top_k=40", "--state-dir", str(state), "--socket", str(d.socket)
        )
        assert r.returncode == 0, r.stderr
        assert f"{SMOLLM2}: temperature=0.0 top_k=40" in r.stdout
        shown = unix_json(d, f"/api/models/{SMOLLM2}")["sampling"]
        assert shown["set"] == {"temperature": 0.0, "top_k": 40} and shown["defaults"] == shown["set"]
        # no temperature in the requests: the model's default (greedy) now, the same answer each time
        _, first = _post(d, "/v1/chat/completions", chat)
        _, second = _post(d, "/v1/chat/completions", chat)
        _, explicit = _post(d, "/v1/chat/completions", {**chat, "temperature": 0})
        text = [x["choices"][0]["message"]["content"] for x in (first, second, explicit)]
        assert text[0] == text[1] == text[2] and text[0]
        # a request's own field wins: sampled at 1.5 with seeds, it is not the greedy answer every time
        hot = [_post(d, "/v1/chat/completions", {**chat, "temperature": 1.5, "seed": s})[1] for s in range(3)]
        assert any(h["choices"][0]["message"]["content"] != text[0] for h in hot)
        status, bad = _post(d, f"/api/models/{SMOLLM2}/sampling", {"sampling": {"temperature": 5}})
        assert status == 400 and "temperature must be a number in [0.0, 2.0]" in bad["error"]["message"]
        status, bad = _post(d, f"/api/models/{SMOLLM2}/sampling", {"sampling": {"beam_width": 4}})
        assert status == 400 and "unknown sampling parameter 'beam_width'" in bad["error"]["message"]
        assert unix_json(d, f"/api/models/{SMOLLM2}")["sampling"]["set"] == {"temperature": 0.0, "top_k": 40}
    finally:
        assert d.stop() == 0
    # with no daemon the CLI writes the store itself; KEY= unsets
    r = llmosd("models", "set", SMOLLM2, "top_k=", "--state-dir", str(state), "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 0, r.stderr
    assert json.loads((state / "models" / SMOLLM2 / "settings.json").read_text()) == {"sampling": {"temperature": 0.0}}
    r = llmosd("models", "set", SMOLLM2, "temperature=hot", "--state-dir", str(state), "--socket", str(tmp_path / "n"))
    assert r.returncode != 0 and "temperature=hot: not a number" in r.stderr
