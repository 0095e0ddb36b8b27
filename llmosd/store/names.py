"""Validation of every untrusted string that becomes part of a store path.

Nothing outside this module builds a path from a name, version, digest or file title without passing
through these checks first (Ollama's BlobsPath lesson: validate by regex before joining).
"""

from __future__ import annotations

import re

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TITLE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class InvalidName(ValueError):
    """A name, version, digest or file title that must not reach the file system."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidName(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise InvalidName(f"invalid version {version!r}: versions are positive integers")
    return version


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidName(f"invalid digest {digest!r}: expected 'sha256:' and 64 lowercase hex digits")
    return digest


def check_title(title: str) -> str:
    """A file's relative path inside a model version (e.g. ``model.onnx``, ``1_Pooling/config.json``)."""
    parts = title.split("/") if isinstance(title, str) else []
    if not parts or len(parts) > 4 or not all(_TITLE_PART.match(p) for p in parts):
        raise InvalidName(f"invalid file path {title!r} in manifest")
    return title
