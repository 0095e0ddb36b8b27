"""Measured batch profiles, part of the store's contract (``profiles/`` beside ``blobs/``).

``profiles/<model-digest>/<device>.json``: one JSON document per (model files, device), written
atomically; the autotune (``llmosd.hardware.autotune``) gives it meaning and decides when one is
stale. ``model-digest`` is the digest of the graph, joined with ``+`` to its external weights' when
they are files of their own. They are cached facts: deleting one costs a calibration, nothing more;
garbage collection removes those whose files no version holds any more.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmosd.atomic import replace_file
from llmosd.store.names import check_digest

PROFILES = "profiles"  # the folder under the store's root
# The same layout for another cached fact of the same key: ``checks/<model-digest>/<cpu-key>.json``, the
# validation gate's short form run on this box's CPU kernels for an artifact exported on others.
CHECKS = "checks"


class Profiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, model_digest: str, device: str) -> Path:
        for digest in model_digest.split("+"):
            check_digest(digest)
        if not device.replace(":", "").isalnum():
            raise ValueError(f"not a device id: {device!r}")
        return self.root / model_digest.replace(":", "-") / f"{device.replace(':', '-')}.json"

    def get(self, model_digest: str, device: str) -> dict[str, Any] | None:
        try:
            raw = json.loads(self._path(model_digest, device).read_text())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def put(self, model_digest: str, device: str, raw: dict[str, Any]) -> Path:
        path = self._path(model_digest, device)
        replace_file(path, json.dumps(raw, indent=2))
        return path

    def prune(self, live: Iterable[str]) -> int:
        """Remove the profiles of model files no version holds (``live``: digests still referenced)."""
        held = {d.replace(":", "-") for d in live}
        removed = 0
        for entry in self.root.iterdir() if self.root.is_dir() else ():
            if not all(part in held for part in entry.name.split("+")):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
