"""Named, scoped bearer tokens for non-local clients, kept hashed in ``tokens.json`` beside the token file.

A token is 32 random bytes (URL-safe base64); the file holds only its SHA-256 (a fast hash is enough for
a secret of that entropy: nothing to brute-force), its name, scopes and creation time, mode 0600,
replaced atomically. The token file of old (``token_file``) keeps working as an ``admin`` token: what
LAN peers present to each other. The daemon reads the file at start and on every reload (SIGHUP).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from llmosd.atomic import replace_file

# infer: the inference routes (/v1 requests, task routes, /v2 infer) and the model list apps read;
# read: status, models, hardware, tasks, metrics; admin: everything (pull, activate, rollback, tune, delete...)
SCOPES = ("infer", "read", "admin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LEGACY = "token-file"  # the name the token file's token goes by


class TokenError(ValueError):
    """A tokens file or a request to change it that cannot be honoured (the message says why)."""


@dataclass(frozen=True)
class Grant:
    name: str
    scopes: frozenset[str]

    def allows(self, needed: frozenset[str]) -> bool:
        """Whether this token may call a route that takes any of ``needed`` (admin may call every route)."""
        return "admin" in self.scopes or bool(self.scopes & needed)


@dataclass(frozen=True)
class Tokens:
    """What the auth middleware checks a presented token against."""

    legacy: str = ""
    named: dict[str, Grant] = field(default_factory=dict)  # sha256 hex -> grant

    def grant(self, presented: str) -> Grant | None:
        if self.legacy and hmac.compare_digest(presented.encode(), self.legacy.encode()):
            return Grant(LEGACY, frozenset({"admin"}))
        return self.named.get(_digest(presented))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_path(token_file: Path) -> Path:
    return token_file.with_name("tokens.json")


def _entries(path: Path) -> list[dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenError(f"{path}: not a tokens file: {exc}") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TokenError(f"{path}: not a tokens file (no 'tokens' list)")
    return entries


def _grant(path: Path, entry: dict[str, object]) -> tuple[str, Grant]:
    name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise TokenError(f"{path}: an entry lacks a name or a sha256")
    if not _NAME.fullmatch(name):  # names reach logs and error messages: no control characters
        raise TokenError(f"{path}: token name {name!r}: letters, digits, '.', '_' or '-', at most 64")
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise TokenError(f"{path}: token {name!r} has scopes {scopes!r}; choose from {', '.join(SCOPES)}")
    return digest, Grant(name, frozenset(str(s) for s in scopes))


def load_tokens(token_file: Path, legacy: str) -> Tokens:
    """The token file's token and the named tokens beside it. Blocking (reads a file)."""
    path = tokens_path(token_file)
    return Tokens(legacy, dict(_grant(path, e) for e in _entries(path)))


def _write(path: Path, entries: list[dict[str, object]]) -> None:
    replace_file(path, json.dumps({"tokens": entries}, indent=2), 0o600)


def parse_scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    if not scopes or not set(scopes) <= set(SCOPES):
        raise TokenError(f"scopes {text!r}: a comma-separated list of {', '.join(SCOPES)}")
    return sorted(set(scopes), key=SCOPES.index)


def add_token(token_file: Path, name: str, scopes: list[str]) -> str:
    """A new token named ``name`` with ``scopes``; returns it (the only time it is shown)."""
    if not _NAME.fullmatch(name) or name == LEGACY:
        raise TokenError(f"token name {name!r}: letters, digits, '.', '_' or '-', at most 64, not {LEGACY!r}")
    path = tokens_path(token_file)
    entries = _entries(path)
    if any(e.get("name") == name for e in entries):
        raise TokenError(f"a token named {name!r} exists: revoke it first")
    token = secrets.token_urlsafe(32)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    entries.append({"name": name, "sha256": _digest(token), "scopes": scopes, "created": created})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, entries)
    return token


def revoke_token(token_file: Path, name: str) -> None:
    path = tokens_path(token_file)
    entries = _entries(path)
    kept = [e for e in entries if e.get("name") != name]
    if len(kept) == len(entries):
        raise TokenError(f"no token named {name!r}")
    _write(path, kept)


def list_tokens(token_file: Path) -> list[dict[str, object]]:
    """Names, scopes and creation times (never the hashes)."""
    entries = _entries(tokens_path(token_file))
    return [{"name": e.get("name"), "scopes": e.get("scopes"), "created": e.get("created")} for e in entries]
