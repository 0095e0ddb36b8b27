"""llmosd.atomic.replace_file: the small files (tokens, keys, known hosts, profiles, units) are replaced
whole, born with their mode, and a failed write leaves the old content and no stray file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmosd.atomic import replace_file


def test_replace_file_is_whole_born_with_its_mode_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    secret = tmp_path / "sub" / "key.pem"
    replace_file(secret, b"first", 0o600)  # the folder is made
    assert secret.read_bytes() == b"first" and secret.stat().st_mode & 0o777 == 0o600
    public = tmp_path / "cert.pem"
    replace_file(public, "text")
    assert public.read_text() == "text" and public.stat().st_mode & 0o777 == 0o644

    with pytest.raises(TypeError):
        replace_file(secret, 42, 0o600)  # type: ignore[arg-type]  # fails before the rename
    assert secret.read_bytes() == b"first"
    assert sorted(p.name for p in secret.parent.iterdir()) == ["key.pem"]  # no temporary left behind
