"""The promises that depend on the CPU's kernels, checked on an ISA this machine may not have: SmolLM2's
fused graph under qemu-user emulating an AVX2 CPU without AVX-512 (EPYC-Rome, as Zen 2 and Zen 3 and
most mini-PCs). ONNX Runtime reads the emulated CPUID and runs that ISA's MLAS kernels, so rounding is
that ISA's (only the speed is not). There, MatMulNBits computes a lone row (M = 1) through another
kernel than a batch, and a row's greedy tokens changed beside others until a lone row was decoded
beside a dummy (llmosd.runtime.invariance).

Emulation is slow (about 4 minutes of one core), so the run (tests/isa_steps.py) starts beside the
other tests as soon as the session's store is exported (conftest.py's store_dir fixture), and this test waits
for its answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_row_decodes_alone_as_in_a_batch_on_avx2(emulated_avx2: tuple[subprocess.Popen[str], Path]) -> None:
    run, log = emulated_avx2
    out, _ = run.communicate(timeout=1800)
    assert run.returncode == 0, log.read_text()[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    # AVX2's lone-row kernel differs, so the load settled on decoding a lone row beside a dummy row (on
    # an emulated AVX-512 CPU, or a native one, it would say "alone")...
    assert result["invariance"] == {"exact": True, "lone_row": "beside a dummy row", "max_logit_diff": 0.0}
    # ...and two rows at different lengths decode together, step after step, the logits each has alone
    assert result["max_logit_diff"] == 0.0
