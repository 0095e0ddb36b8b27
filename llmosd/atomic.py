"""Replacing a small file whole: readers see the old content or the new, never a part, even across a
crash or a full disk (the store's model files have their own, staged, path: ``llmosd.store``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` beside ``path`` and rename it over ``path``. The file is born 0600 (mkstemp) and
    given ``mode`` before it has content, so a key or a token hash is never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
