"""Validate an exported artifact against the PyTorch model it came from.

The candidate is the whole served pipeline (llmosd's tokenizer, the ONNX session, the task's own
runtime adapter: what the daemon will run); the reference is the task's PyTorch reference fed the same
token ids. A task may instead compute figures of its own from the session (causal LMs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmosd.runtime.adapters import Adapting
from llmosd.runtime.backend import Backend, Input
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.providers import Placement, ProviderSelector
from llmosd.runtime.tokenizer import TextTokenizer
from llmosd.tasks import Checked, Export, Task, Tolerance

INPUTS = (Path(__file__).parent / "validation.txt").read_text().splitlines()


class ValidationFailed(Exception):
    pass


def _session(model: Path, devices: tuple[str, ...]) -> tuple[Any, Placement]:
    # A CUDA-only artifact (fp16) is still checked where no GPU loads: ORT's CPU provider runs fp16
    # graphs, more slowly; the manifest records which device produced the figures.
    return ProviderSelector().create(model, (*devices, "cpu"))


def _run(backend: Backend[Any], items: Sequence[Input]) -> list[np.ndarray]:
    return [np.asarray(o.values) for o in backend.run(backend.prepare(items))]


def invariance(backend: Backend[Any], items: Sequence[Input], batched: Sequence[np.ndarray]) -> float:
    """Max abs difference of each input's output alone, in the whole batch (padded to its longest) and
    in that batch reversed (every other position): what the daemon's batching must not change."""
    reversed_ = _run(backend, items[::-1])[::-1]
    alone = [_run(backend, [item])[0] for item in items]
    return float(
        max(max(np.abs(a - b).max(), np.abs(r - b).max()) for a, r, b in zip(alone, reversed_, batched, strict=True))
    )


def _compared(
    task: Task, export: Export, check: Checked, runtime: dict[str, Any], tokenizer_file: Path
) -> tuple[dict[str, float], list[Any]]:
    """Reference against the task's own adapter on the artifact, and the inputs they were run on."""
    assert export.reference is not None and export.figures is not None  # Export.__post_init__
    items = task.validation_inputs(INPUTS)
    batch = check.tokenizer.pad(check.tokenizer.encode_inputs(items, truncate=True))
    ref = export.reference(check.src, batch, runtime)
    backend = task.adapter(Adapting(check.session, tokenizer_file, runtime, "validation"))
    if isinstance(backend, TextGenerator):
        raise ValueError(f"the {task.name} adapter generates text: its export needs a validate hook")
    cand = _run(backend, items)
    figs = export.figures(ref, cand) | {"batch_invariance_max_abs_diff": invariance(backend, items, cand)}
    return figs, [list(i) if isinstance(i, tuple) else i for i in items]


def check_figures(figs: dict[str, Any], tol: Tolerance) -> list[str]:
    problems = []
    if tol.min_cosine is not None and figs["min_cosine"] < tol.min_cosine:
        problems.append(f"min cosine {figs['min_cosine']:.5f} < {tol.min_cosine}")
    if tol.mean_cosine is not None and figs["mean_cosine"] < tol.mean_cosine:
        problems.append(f"mean cosine {figs['mean_cosine']:.5f} < {tol.mean_cosine}")
    if tol.max_abs_diff is not None and figs["max_abs_diff"] > tol.max_abs_diff:
        problems.append(f"max abs diff {figs['max_abs_diff']:.2e} > {tol.max_abs_diff}")
    if tol.label_agreement is not None and figs["label_agreement"] < tol.label_agreement:
        problems.append(f"label agreement {figs['label_agreement']:.3f} < {tol.label_agreement}")
    if tol.top1_agreement is not None and figs["top1_agreement"] < tol.top1_agreement:
        problems.append(f"top-1 agreement {figs['top1_agreement']:.3f} < {tol.top1_agreement}")
    moved = figs.get("batch_invariance_max_abs_diff")
    if tol.batch_invariance is not None and moved is not None and moved > tol.batch_invariance:
        problems.append(f"an output alone and in a batch differ by {moved:.2e} > {tol.batch_invariance}")
    ratio = float(figs.get("perplexity_ratio", 1.0))
    if tol.perplexity_ratio is not None and not 1 / tol.perplexity_ratio <= ratio <= tol.perplexity_ratio:
        # both ways: a perplexity well below the reference's is a different model too
        problems.append(
            f"perplexity ratio {ratio:.4f} outside [{1 / tol.perplexity_ratio:.4f}, {tol.perplexity_ratio}]"
        )
    return problems


def validate(
    src: Path,
    model: Path,
    tokenizer_file: Path,
    task: Task,
    runtime: dict[str, Any],
    devices: tuple[str, ...],
    tol: Tolerance,
) -> dict[str, Any]:
    export = task.export
    assert export is not None  # the exporter refuses a task without one
    tokenizer = TextTokenizer(tokenizer_file, int(runtime["max_seq_length"]))
    placed: list[Placement] = []

    def open_session() -> Any:
        session, placement = _session(model, devices)
        placed.append(placement)
        return session

    check = Checked(src, tokenizer, open_session)
    if export.validate is not None:
        figs, inputs = export.validate(check), list(INPUTS)
    else:
        figs, inputs = _compared(task, export, check, runtime, tokenizer_file)
    recheck = figs.pop("recheck", None)  # reference data, not a figure
    result: dict[str, Any] = {
        "reference": "pytorch " + str(figs.pop("reference_dtype", "fp32")),
        "device": placed[0].device,
        "cpu": built_on(),
        "inputs": inputs,
        "figures": figs,
        "tolerance": {k: v for k, v in vars(tol).items() if v is not None},
    }
    if recheck is not None:
        result["recheck"] = recheck
    problems = check_figures(figs, tol)
    if problems:
        raise ValidationFailed("; ".join(problems))
    result["passed"] = True
    return result


def built_on() -> dict[str, Any]:
    """The CPU the gate ran on, as the kernels ONNX Runtime chose by: a box whose kernels differ
    re-checks the artifact before serving it (llmosd.scheduler.portable)."""
    from llmosd.hardware.cpu import probe_cpu

    cpu = probe_cpu()
    return {"arch": cpu.arch, "kernels": list(cpu.kernels), "model": cpu.model}
