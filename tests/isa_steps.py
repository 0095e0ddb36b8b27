"""Run under an emulated CPU by tests/test_isa.py: load a fused causal LM from a store (its warm-up settles
how a lone row is decoded), decode two prompts three steps alone and then together, and print as JSON
what was settled and the largest difference of a row's logits together against alone.

    python tests/isa_steps.py STORE MODEL
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmosd.runtime import ProviderSelector, load  # noqa: E402
from llmosd.store import ModelStore  # noqa: E402
from llmosd.tasks import discover  # noqa: E402

STEPS = 3


def greedy(lm: Any, rows: list[int], first: list[int]) -> np.ndarray:
    """``[rows, STEPS, vocab]`` logits of greedy steps from these first tokens."""
    out, logits = [[t] for t in first], []
    for _ in range(STEPS):
        logits.append(lm.decode(rows, [o[-1] for o in out]))
        for o, t in zip(out, logits[-1].argmax(-1), strict=True):
            o.append(int(t))
    return np.stack(logits, axis=1)


def main(store_dir: Path, model: str) -> dict[str, Any]:
    store = ModelStore(store_dir)
    one_thread = ProviderSelector("cpu", 1, False)
    gen: Any = load(store, store.manifest(model), one_thread, discover().adapters(), max_sequences=4).backend
    lm = gen.lm
    prompts = [gen.encode(t, special=False) for t in ("The capital of France is", "def fib(n):")]
    alone = []
    for p in prompts:
        first, row = lm.prefill(p)
        alone.append(greedy(lm, [row], [int(first.argmax())])[0])
        lm.free(row)
    rows, firsts = [], []
    for p in prompts:
        first, row = lm.prefill(p)
        rows.append(row)
        firsts.append(int(first.argmax()))
    together = greedy(lm, rows, firsts)
    diff = max(float(np.abs(t - a).max()) for t, a in zip(together, alone, strict=True))
    return {"invariance": gen.invariance.as_dict(), "max_logit_diff": diff}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
