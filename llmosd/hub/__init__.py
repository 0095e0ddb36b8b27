"""Pulling a model from the Hugging Face hub by name (``llmosd pull hf.co/ORG/REPO``, ``POST
/api/models/pull``): download the files its recipe needs into the hub's cache, then export, validate and
store it as ``llmosd export`` does. huggingface_hub is imported only when a pull runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmosd.export import ExportError, export_model, missing_export_extra
from llmosd.hub.fetch import Fetched, FileProgress, HubError, fetch
from llmosd.hub.plan import HubRef, UnsupportedRepository, default_name, is_hub_ref, parse_hub_ref, task_of
from llmosd.store import Manifest, ModelStore, check_name
from llmosd.tasks import Tasks

__all__ = ["HubError", "HubPull", "HubRef", "is_hub_ref", "parse_hub_ref", "pull"]


@dataclass(frozen=True)
class HubPull:
    """What a pull asks beyond the reference (each as ``llmosd export`` takes it)."""

    task: str | None = None  # None: from the checkpoint's files and config
    precision: str = "auto"
    name: str | None = None  # None: from the repository's name
    activate: bool = True


class Stage(Protocol):
    stage: str


async def pull(
    store: ModelStore,
    ref: HubRef,
    tasks: Tasks,
    how: HubPull = HubPull(),
    progress: FileProgress | None = None,
    stage: Stage | None = None,
) -> Manifest:
    """Download, export, validate and store; HubError (with an HTTP status) where it cannot, the store as it
    was. The export runs in a child process, as every export does; ``stage`` is told when it starts."""
    missing = missing_export_extra()
    if missing:
        raise HubError(
            f"pulling from the hub exports the model, which needs llmosd[export] ({', '.join(missing)})", 501
        )
    name = check_name(how.name) if how.name is not None else default_name(ref)
    if how.task is not None and how.task not in tasks.exportable():
        raise HubError(f"unknown task {how.task!r}; choose from {', '.join(tasks.exportable())}", 400)
    fetched = await asyncio.to_thread(fetch, ref, progress)
    try:
        task = how.task or task_of(fetched.json("config.json"), fetched.files)
    except UnsupportedRepository as exc:
        raise HubError(f"{ref}: {exc}", 400) from None
    src = _source(fetched)
    if stage is not None:
        stage.stage = "exporting"
    pinned = HubRef(ref.repo_id, fetched.commit, ref.quant)  # the commit it came from, in the manifest
    try:
        return await export_model(
            store,
            src,
            task=tasks[task],
            precision=how.precision,
            name=name,
            source_id=str(pinned),
            activate=how.activate,
        )
    except ExportError as exc:
        raise HubError(f"{ref}: {exc}", 422) from None


def _source(fetched: Fetched) -> Path:
    ggufs = [f for f in fetched.files if f.lower().endswith(".gguf")]
    return fetched.folder / ggufs[0] if ggufs else fetched.folder
