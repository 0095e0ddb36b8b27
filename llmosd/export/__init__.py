"""Run an export recipe in a child process and publish its artifact into the store.

The child (``python -m exporters``) is the only process that imports torch/transformers/optimum; the
daemon stays small and its event loop keeps running (and answering health checks) while it works.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmosd.store import Manifest, ModelStore, TensorSpec
from llmosd.store.names import check_name, check_version
from llmosd.tasks import PRECISIONS, Task

log = logging.getLogger(__name__)

_EXTRA_DISTRIBUTIONS = ("torch", "transformers", "optimum-onnx", "onnx")


class ExportError(Exception):
    pass


def missing_export_extra() -> list[str]:
    """The export extra's distributions that are not installed (asked of package metadata: importing
    even a parent package such as ``optimum`` would drag it into the daemon)."""
    missing = []
    for dist in _EXTRA_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


@dataclass(frozen=True)
class Job:
    """One export: a source, a recipe's choices, and where it goes in the store."""

    src: Path
    task: str
    precision: str
    name: str
    version: str | None = None
    source_id: str | None = None
    activate: bool = True
    tolerances: dict[str, float] = field(default_factory=dict)
    exporter: str = "auto"
    options: dict[str, str] = field(default_factory=dict)
    sampling: dict[str, float | int] = field(default_factory=dict)

    def check(self) -> None:
        check_name(self.name)
        if self.version is not None:
            check_version(self.version)
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        gguf = self.src.is_file() and self.src.suffix == ".gguf"
        if not gguf and not (self.src / "config.json").is_file():
            raise ExportError(f"{self.src} is not a Hugging Face model folder (no config.json) nor a .gguf file")
        if missing := missing_export_extra():
            raise ExportError(
                f"exporting needs {', '.join(missing)}: install the export extra, pip install 'llmosd[export]'"
            )

    def command(self, out: Path) -> list[str]:
        """The child's command line (``python -m exporters``)."""
        cmd = [sys.executable, "-m", "exporters", "--src", str(self.src.resolve()), "--task", self.task]
        cmd += ["--precision", self.precision, "--out", str(out)]
        if self.source_id:
            cmd += ["--source-id", self.source_id]
        for key, value in self.tolerances.items():
            cmd += ["--tolerance", f"{key}={value}"]
        cmd += ["--exporter", self.exporter]
        for key, text in self.options.items():
            cmd += ["--option", f"{key}={text}"]
        for key, number in self.sampling.items():
            cmd += ["--sampling", f"{key}={number}"]
        return cmd


async def export_model(
    store: ModelStore,
    src: Path,
    *,
    task: Task,
    precision: str,
    name: str,
    version: str | None = None,
    source_id: str | None = None,
    activate: bool = True,
    tolerances: dict[str, float] | None = None,
    exporter: str = "auto",
    options: dict[str, str] | None = None,
    sampling: dict[str, float | int] | None = None,
) -> Manifest:
    """Export ``src`` as a model of ``task`` at ``precision``; ``auto`` tries the task's precisions fastest
    first (its ``Export.auto``) and keeps the first the quality gate passes (each refusal is logged)."""
    if task.export is None:
        raise ExportError(f"the {task.name} task has no export recipe: its models come from a registry")
    order = task.export.auto if precision == "auto" else (precision,)
    job = Job(src, task.name, precision, name, version, source_id, activate)
    job = replace(job, tolerances=tolerances or {}, exporter=exporter, options=options or {}, sampling=sampling or {})
    for i, candidate in enumerate(order):
        try:
            return await _export(store, replace(job, precision=candidate))
        except ExportError as exc:
            if i == len(order) - 1 or "validation refused" not in str(exc):
                raise
            log.info("%s; trying %s", exc, order[i + 1])
    raise AssertionError("unreachable")


async def _run_child(cmd: list[str], name: str) -> None:
    # MALLOC_MMAP_THRESHOLD_: blocks of 256 KiB and more mapped on their own and given back when freed; under
    # glibc's default the post-pass's freed graph stayed as heap holes beside the gate's reference (a 1.2B
    # Llama's export peaked at 4.3 GB, 2.9 GB with this)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_=str(256 << 10))
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:  # daemon stopping: the child must not outlive it
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        detail = errors[-1].removeprefix("error: ") if errors else "\n".join(lines[-15:])
        raise ExportError(f"export of {name} failed: {detail}")


def _draft(result: dict[str, Any], job: Job) -> Manifest:
    """The manifest of what the child wrote (``result.json``), before the store names its files."""
    return Manifest(
        name=job.name,
        version=job.version or "",
        task=result["task"],
        precision=result["precision"],
        files=(),
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in result["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in result["outputs"]),
        devices=tuple(result["devices"]),
        runtime=result["runtime"],
        recipe=result["recipe"],
        validation=result["validation"],
        source=result["source"],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


async def _export(store: ModelStore, job: Job) -> Manifest:
    job.check()
    with store.tmpdir("export-") as work:
        out = work / "out"
        log.info("exporting %s from %s (%s, %s) in a child process", job.name, job.src, job.task, job.precision)
        await _run_child(job.command(out), job.name)
        result = json.loads((out / "result.json").read_text())
        files = {title: (out / title, role) for title, role in result["files"].items()}
        manifest = await asyncio.to_thread(store.publish, _draft(result, job), files, activate=job.activate)
    figs = manifest.validation.get("figures", {})
    log.info("stored %s (%s); validation %s", manifest.ref, job.precision, figs)
    return manifest
