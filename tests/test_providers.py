"""Provider choice on real ONNX Runtime sessions (the probe model), built from what the hardware probe
finds; the fake is only the provider list the probe is shown."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from llmosd.hardware.providers import probe_providers
from llmosd.runtime.providers import CPU, CUDA, PROBE_MODEL, CudaState, ProviderSelector
from tests.test_placement import box


def found(available: Callable[[], list[str]]) -> CudaState:
    """What the probe finds of CUDA when ORT lists ``available`` (the sessions it tries are real)."""
    return replace(box(0), providers=probe_providers(available=available)).cuda


def run_probe(session: object) -> float:
    out = session.run(None, {"x": np.array([-2.0], dtype=np.float32)})  # type: ignore[attr-defined]
    return float(out[0][0])


def test_cpu_only_box_never_tries_cuda(caplog: pytest.LogCaptureFixture) -> None:
    selector = ProviderSelector(cuda=found(lambda: [CPU]))
    session, placement = selector.create(PROBE_MODEL)
    assert placement.device == "cpu" and placement.note == "" and run_probe(session) == 0.0
    assert selector.cuda == "absent" and "CUDA" not in caplog.text


def test_listed_but_broken_cuda_falls_back_once(caplog: pytest.LogCaptureFixture) -> None:
    cuda = found(lambda: [CUDA, CPU])
    selector = ProviderSelector(cuda=cuda)
    if cuda == "loads":
        pytest.skip("CUDA really loads on this machine; the fallback path needs a box without a GPU")
    with caplog.at_level(logging.WARNING):
        placements = [selector.create(PROBE_MODEL)[1] for _ in range(3)]
    assert {p.device for p in placements} == {"cpu"} and placements[0].note == "cuda listed but does not load"
    assert caplog.text.count("does not load") == 1  # logged once, not per session
    with pytest.raises(RuntimeError, match="device = cuda"):
        ProviderSelector(device="cuda", cuda=cuda).create(PROBE_MODEL)
    with pytest.raises(RuntimeError, match="runs only on cuda"):
        selector.create(PROBE_MODEL, devices=("cuda",))


def test_device_cpu_is_honoured() -> None:
    _, placement = ProviderSelector(device="cpu", cuda="loads").create(PROBE_MODEL)  # never asks for CUDA
    assert placement.device == "cpu" and placement.providers == (CPU,)
    with pytest.raises(ValueError, match="device must be"):
        ProviderSelector(device="tpu")
