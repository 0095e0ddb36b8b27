"""Provider choice on real ONNX Runtime sessions (the probe model); the fake is only the provider list."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from llmosd.runtime.providers import CPU, CUDA, PROBE_MODEL, ProviderSelector


def run_probe(session: object) -> float:
    out = session.run(None, {"x": np.array([-2.0], dtype=np.float32)})  # type: ignore[attr-defined]
    return float(out[0][0])


def test_cpu_only_box_never_tries_cuda(caplog: pytest.LogCaptureFixture) -> None:
    selector = ProviderSelector(available=lambda: [CPU])
    session, placement = selector.create(PROBE_MODEL)
    assert placement.device == "cpu" and placement.note == "" and run_probe(session) == 0.0
    assert not selector.cuda_loads() and "CUDA" not in caplog.text


def test_listed_but_broken_cuda_falls_back_once(caplog: pytest.LogCaptureFixture) -> None:
    selector = ProviderSelector(available=lambda: [CUDA, CPU])
    if selector.cuda_loads():
        pytest.skip("CUDA really loads on this machine; the fallback path needs a box without a GPU")
    with caplog.at_level(logging.WARNING):
        placements = [selector.create(PROBE_MODEL)[1] for _ in range(3)]
    assert {p.device for p in placements} == {"cpu"} and placements[0].note == "cuda listed but does not load"
    assert caplog.text.count("does not load") == 1  # logged once, not per session
    with pytest.raises(RuntimeError, match="device = cuda"):
        ProviderSelector(device="cuda", available=lambda: [CUDA, CPU]).create(PROBE_MODEL)
    with pytest.raises(RuntimeError, match="runs only on cuda"):
        selector.create(PROBE_MODEL, devices=("cuda",))


def test_device_cpu_is_honoured() -> None:
    _, placement = ProviderSelector(device="cpu", available=lambda: [CUDA, CPU]).create(PROBE_MODEL)
    assert placement.device == "cpu" and placement.providers == (CPU,)
    with pytest.raises(ValueError, match="device must be"):
        ProviderSelector(device="tpu")
