"""What a task is: the one object a package registers under the ``llmosd.tasks`` entry-point group.

A task names the manifest's ``task`` and brings everything that differs from one task to another:
how it is exported and validated (``Export``, run in the exporter's child process, where torch is),
how a session becomes a backend (``adapter``, the runtime), what clients send and get (``routes`` and
their OpenAPI ``paths``), and what its models add to status (``describe``). The built-in tasks are
registered the same way, in llmosd's own pyproject.toml. The README's "Tasks are plugins" says how
to write one.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy.typing as npt
from aiohttp import web

from llmosd.runtime.adapters import Adapter, Served
from llmosd.runtime.backend import Input
from llmosd.runtime.tokenizer import Batch, TextTokenizer

PRECISIONS = ("fp32", "fp16", "int8", "int4")
Array = npt.NDArray[Any]
INVARIANT = 1e-5  # an encoder's output alone vs in a padded batch, where the kernels are not bitwise


@dataclass(frozen=True)
class Tolerance:
    """What an export must achieve against PyTorch before its artifact is trusted (None: not checked)."""

    min_cosine: float | None = None
    mean_cosine: float | None = None
    max_abs_diff: float | None = None
    label_agreement: float | None = None
    top1_agreement: float | None = None  # causal LMs: teacher-forced next-token argmax vs PyTorch
    perplexity_ratio: float | None = None  # causal LMs: export's perplexity / PyTorch's, on a fixed text
    # Encoders: max abs difference of an output alone and inside a padded batch (validate.invariance).
    # Bitwise where the kernels allow; INVARIANT is the bound for where they do not.
    batch_invariance: float | None = None


@dataclass(frozen=True)
class Source:
    """What an export's ``settings`` hook reads: the source folder and its config.json, the exported
    graph's outputs (name, dtype, shape), and the operator's ``--option`` and ``--sampling`` pairs."""

    path: Path
    config: Mapping[str, Any]
    outputs: Sequence[Mapping[str, Any]]
    options: Mapping[str, str] = field(default_factory=dict)
    sampling: Mapping[str, str] = field(default_factory=dict)
    tokenizer: Path | None = None  # the artifact's tokenizer.json, once written

    def json(self, name: str) -> Any:
        """A JSON file of the source folder (``modules.json``, ``generation_config.json``), None if absent."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class Checked:
    """What a task's own ``validate`` hook receives (causal LMs: teacher-forced figures, not outputs).
    The session opens when first asked for: a hook can run its PyTorch reference, and let it go, before
    the artifact is in memory beside it."""

    src: Path
    tokenizer: TextTokenizer
    open_session: Callable[[], Any]

    @cached_property
    def session(self) -> Any:
        return self.open_session()


# The PyTorch reference of an encoder task: the source folder, the padded batch of the validation
# inputs (llmosd's own tokenisation) and the runtime settings -> one array per input.
Reference = Callable[[Path, Batch, Mapping[str, Any]], Sequence[Array]]
# Reference against candidate (the served pipeline's outputs, one array per input) -> named figures.
Figures = Callable[[Sequence[Array], Sequence[Array]], dict[str, float]]


@dataclass(frozen=True)
class Export:
    """How ``llmosd export --task NAME`` builds and checks an artifact of this task.

    The graph comes from optimum's exporter for ``optimum_task`` (or, with ``fused``, from
    onnxruntime-genai's builder where it supports the architecture), then ORT's fusions and the
    precision's quantisation. Validation runs the validation inputs (``pairs``: each text against the
    next three, for cross-encoders) through the task's own adapter on the artifact and compares with
    ``reference``, or hands ``validate`` the session for figures of its own. The figures are checked
    against ``tolerances[precision]``; a task offers exactly the precisions it has tolerances for."""

    optimum_task: str
    tolerances: Mapping[str, Tolerance]
    settings: Callable[[Source], dict[str, Any]]  # the manifest's runtime settings, beside max_seq_length
    reference: Reference | None = None
    figures: Figures | None = None
    # figures of its own; under "recheck", the reference data its adapter's recheck() reads on a box whose
    # CPU kernels differ from the exporting one's (llmosd.scheduler.portable)
    validate: Callable[[Checked], dict[str, Any]] | None = None
    pairs: bool = False
    auto: tuple[str, ...] = ("int8", "fp32")  # `--precision auto`: tried in this order, first to pass kept
    # Int8 on the MatMuls only: per-channel signed weights. Per-tensor weights lose too much
    # (MiniLM min cosine 0.87) and quantising the embedding table too costs ~0.01 of min cosine.
    int8_ops: tuple[str, ...] = ("MatMul",)
    # "per-token" (weights and activations int8, one activation scale per row: batch-invariant) or
    # "weight-only" (MatMulNBits; what causal LMs need).
    int8_scheme: str = "per-token"
    opset: int = 17
    fused: bool = False
    extra_files: Mapping[str, str] = field(default_factory=dict)  # source files kept beside the graph, by role

    def __post_init__(self) -> None:
        if bad := sorted(set(self.tolerances) - set(PRECISIONS)):
            raise ValueError(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
        if self.validate is None and (self.reference is None or self.figures is None):
            raise ValueError("an export validates by reference and figures, or by a validate hook of its own")


@dataclass(frozen=True)
class Task:
    """One task: registered as ``NAME = "package.module:TASK"`` under ``[project.entry-points."llmosd.tasks"]``."""

    name: str  # the manifest's task, e.g. "token-classification"
    summary: str
    adapter: Adapter  # session + settings -> a Backend (dynamic batcher) or a TextGenerator (generation engine)
    export: Export | None = None  # None: models of this task come from a registry, never exported here
    routes: Sequence[web.AbstractRouteDef] = ()  # its HTTP routes; none: served over /v2 (raw tensors) only
    paths: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # the routes' OpenAPI path items
    describe: Callable[[Served], dict[str, Any]] | None = None  # fields its models add to status and cards
    latency_budget_ms: float = 250.0  # the autotune's budget for one batch (causal LMs: one decode step)

    def validation_inputs(self, texts: Sequence[str]) -> list[Input]:
        """The validation texts, or for a pair task each text as a query against the next three."""
        if self.export is None or not self.export.pairs:
            return list(texts)
        return [(q, texts[(i + k) % len(texts)]) for i, q in enumerate(texts) for k in (1, 2, 3)]


def deferred(target: str) -> Callable[..., Any]:
    """A hook that lives in export-only code (``"module:function"``), imported when first called: in the
    exporter's child process, never when the daemon imports the task."""

    def call(*args: Any) -> Any:
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(*args)

    return call
