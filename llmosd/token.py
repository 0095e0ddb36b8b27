"""The bearer token non-local clients must present, created once with mode 0600."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race: use its token
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("created access token file %s (mode 0600)", path)
        return token
    if path.stat().st_mode & 0o077:
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    if len(token) < 16:
        raise ValueError(f"token in {path} is shorter than 16 characters")
    return token
