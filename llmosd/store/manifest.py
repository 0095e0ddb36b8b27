"""The manifest of one model version: the typed form of ``models/<name>/<version>/manifest.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from llmosd.store.names import check_digest, check_name, check_title, check_version

SCHEMA = 1
# A task's name (which tasks exist is the installed packages' business, llmosd.tasks: the store keeps
# a plugin's model even while no installed package serves it).
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# model-data: the weights of a graph stored with external data (``model.onnx.data``, past protobuf's 2 GB)
ROLES = ("model", "model-data", "tokenizer", "config", "generation-config")
EXTERNAL_DATA = "model.onnx.data"  # the location the graph names its weights by


class ManifestError(ValueError):
    """A manifest that does not describe a loadable model version."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    digest: str
    size: int
    role: str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    task: str
    precision: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Execution providers this artifact is meant for; fp16 graphs are CUDA-only.
    devices: tuple[str, ...] = ("cpu", "cuda")
    # Task settings the runtime needs: pooling, normalize, max_seq_length, labels.
    runtime: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema: int = SCHEMA

    def file(self, role: str) -> FileEntry:
        for entry in self.files:
            if entry.role == role:
                return entry
        raise ManifestError(f"{self.name}:{self.version} has no {role} file")

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def model_digest(self) -> str:
        """What cached facts about the graph are keyed by (profiles/, checks/): the graph's digest, joined
        with ``+`` to its weights' where they are a file of their own (one graph may name many)."""
        return "+".join(f.digest for f in self.files if f.role in ("model", "model-data"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            if data.get("schema") != SCHEMA:
                raise ManifestError(f"unsupported manifest schema {data.get('schema')!r}")
            manifest = cls(
                name=check_name(data["name"]),
                version=check_version(data["version"]),
                task=data["task"],
                precision=data["precision"],
                files=tuple(
                    FileEntry(check_title(f["path"]), check_digest(f["digest"]), int(f["size"]), f["role"])
                    for f in data["files"]
                ),
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
                outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
                devices=tuple(data.get("devices", ("cpu", "cuda"))),
                runtime=dict(data.get("runtime", {})),
                recipe=dict(data.get("recipe", {})),
                validation=dict(data.get("validation", {})),
                source=dict(data.get("source", {})),
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"malformed manifest: {exc}") from exc
        if not isinstance(manifest.task, str) or not TASK_NAME.fullmatch(manifest.task):
            raise ManifestError(f"malformed task name {manifest.task!r}")
        if manifest.precision not in PRECISIONS:
            raise ManifestError(f"unknown precision {manifest.precision!r}")
        if bad := sorted({f.role for f in manifest.files} - set(ROLES)):
            raise ManifestError(f"unknown file role(s) {', '.join(bad)}")
        if not any(f.role == "model" for f in manifest.files):
            raise ManifestError("manifest lists no model file")
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError("manifest is not a JSON object")
        return cls.from_dict(data)
