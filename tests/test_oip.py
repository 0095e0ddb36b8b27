"""/v2 (Open Inference Protocol) on the real daemon, spoken by Triton's own tritonclient.http."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np
import pytest

from llmosd.store import ModelStore
from tests.conftest import DEFAULT, SENTENCES, SMOLLM2, Daemon


def client(daemon: Daemon) -> Any:
    import tritonclient.http as th

    return th.InferenceServerClient(url=f"127.0.0.1:{daemon.port}", concurrency=16)


def encoder_inputs(n: int, width: int = 12) -> dict[str, np.ndarray]:
    """A real tokenised batch of n sentences, padded to ``width`` (one shape, so requests stack)."""
    from tokenizers import Tokenizer

    from tests.conftest import minilm_path

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.enable_padding(length=width)
    tok.enable_truncation(width)
    enc = tok.encode_batch(SENTENCES[:n])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.zeros_like(ids),
    }


def triton_inputs(feeds: dict[str, np.ndarray], binary: bool = True) -> list[Any]:
    import tritonclient.http as th

    out = []
    for name, array in feeds.items():
        t = th.InferInput(name, list(array.shape), "INT64")
        t.set_data_from_numpy(array, binary_data=binary)
        out.append(t)
    return out


def open_raw(store_dir: Any, name: str) -> Any:
    import onnxruntime as ort

    store = ModelStore(store_dir)
    return ort.InferenceSession(str(store.file_path(store.manifest(name), "model")), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def raw_session(store_dir: Any) -> Any:
    return open_raw(store_dir, DEFAULT)


def test_server_and_model_metadata(daemon: Daemon) -> None:
    c = client(daemon)
    assert c.is_server_live() and c.is_server_ready()
    assert c.get_server_metadata()["name"] == "llmosd"
    assert c.is_model_ready(DEFAULT) and c.is_model_ready(DEFAULT, model_version="1")
    assert not c.is_model_ready(DEFAULT, model_version="7") and not c.is_model_ready("nope")
    md = c.get_model_metadata(DEFAULT)
    assert md["platform"] == "onnxruntime_onnx" and md["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in md["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
        ("token_type_ids", "INT64", [-1, -1]),
    ]
    assert md["outputs"] == [{"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 384]}]
    gen = c.get_model_metadata(SMOLLM2, model_version="1")
    assert sum(i["name"].startswith("past_key_values.") for i in gen["inputs"]) == 60


@pytest.mark.parametrize("binary", [True, False])
def test_infer_returns_what_the_raw_session_returns(daemon: Daemon, raw_session: Any, binary: bool) -> None:
    import tritonclient.http as th

    feeds = encoder_inputs(5)
    expected = raw_session.run(None, feeds)[0]
    outputs = [th.InferRequestedOutput("last_hidden_state", binary_data=binary)]
    result = client(daemon).infer(DEFAULT, triton_inputs(feeds, binary), outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("last_hidden_state"), expected)


def test_concurrent_requests_are_stacked_into_batches(daemon: Daemon, store_dir: Any) -> None:
    """fp32, because dynamic int8 quantises activations per run: a stacked batch shifts int8 results."""
    raw = open_raw(store_dir, "minilm-fp32")
    feeds = [encoder_inputs(1 + i % 3) for i in range(24)]
    c = client(daemon)
    # tritonclient's own concurrency (greenlets over 16 connections): its client is not thread-safe
    pending = [c.async_infer("minilm-fp32", triton_inputs(f)) for f in feeds]
    results = [p.get_result().as_numpy("last_hidden_state") for p in pending]
    for f, got in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got, raw.run(None, f)[0], atol=1e-4)  # stacked: the same within float noise
    with urllib.request.urlopen(f"{daemon.url}/api/status") as r:
        models = {m["name"]: m for m in json.load(r)["models"]}
    assert models["minilm-fp32"]["instances"][0]["tensors"]["largest_batch"] > 1


BAD = [
    ({"inputs": []}, 400, "non-empty"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}, 400, "must be INT64"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}]}, 400, "3 elements"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "STRING", "data": [1, 2]}]}, 400, "datatype"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}, 400, "missing input"),
    ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "unknown input"),
    (
        {
            "inputs": [
                {"name": n, "shape": [1, 2], "datatype": "INT64", "data": [101, 10**9] if n == "input_ids" else [1, 1]}
                for n in ("input_ids", "attention_mask", "token_type_ids")
            ]
        },
        400,
        "the model rejected these tensors",
    ),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_infer_requests_get_a_kserve_error(daemon: Daemon, body: dict[str, Any], status: int, message: str) -> None:
    req = urllib.request.Request(f"{daemon.url}/v2/models/{DEFAULT}/infer", data=json.dumps(body).encode())
    try:
        urllib.request.urlopen(req)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == status
        error = json.load(exc)["error"]
        assert isinstance(error, str) and message in error  # KServe's shape: a bare string
