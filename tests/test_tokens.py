"""Scoped tokens without a daemon: the file (hashed, 0600, atomic), the grants, and the scope table
covering every route the app serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmosd.api.scopes import ADMIN, EITHER, INFER, PUBLIC, READ, ROUTES
from llmosd.tokens import TokenError, add_token, list_tokens, load_tokens, parse_scopes, revoke_token


def test_tokens_are_stored_hashed_and_grant_their_scopes(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    app = add_token(token_file, "app", parse_scopes("infer"))
    ops = add_token(token_file, "ops", parse_scopes("read,admin"))
    raw = (tmp_path / "tokens.json").read_text()
    assert app not in raw and ops not in raw and (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    tokens = load_tokens(token_file, "the-token-file-token")
    grant = tokens.grant(app)
    assert grant is not None and grant.name == "app" and grant.allows(INFER) and grant.allows(EITHER)
    assert not grant.allows(READ) and not grant.allows(ADMIN)
    admin = tokens.grant(ops)
    assert admin is not None and admin.allows(INFER) and admin.allows(ADMIN)  # admin may call every route
    legacy = tokens.grant("the-token-file-token")
    assert legacy is not None and legacy.allows(ADMIN)
    assert tokens.grant(app[:-1]) is None and tokens.grant("") is None
    with pytest.raises(TokenError, match="exists"):
        add_token(token_file, "app", ["infer"])
    with pytest.raises(TokenError, match="infer, read, admin"):
        parse_scopes("root")
    with pytest.raises(TokenError, match="token name"):
        add_token(token_file, "bad name\n", ["infer"])
    revoke_token(token_file, "app")
    assert [t["name"] for t in list_tokens(token_file)] == ["ops"]
    assert load_tokens(token_file, "").grant(app) is None
    with pytest.raises(TokenError, match="no token named"):
        revoke_token(token_file, "app")


def test_a_broken_tokens_file_is_refused_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [{"name": "x", "sha256": "00", "scopes": ["infer"]}]}))
    with pytest.raises(TokenError, match="lacks a name or a sha256"):
        load_tokens(tmp_path / "token", "")
    forged = {"name": "x\n2026-12-01 INFO llmosd: forged", "sha256": "0" * 64, "scopes": ["infer"]}
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [forged]}))
    with pytest.raises(TokenError, match="token name"):
        load_tokens(tmp_path / "token", "")
    (tmp_path / "tokens.json").write_text("{")
    with pytest.raises(TokenError, match="not a tokens file"):
        load_tokens(tmp_path / "token", "")


def test_every_route_declares_its_scope(tmp_path: Path) -> None:
    from llmosd.api import AppState, make_app
    from llmosd.api.scopes import TASK_ROUTES
    from llmosd.api.state import Live
    from llmosd.config import load_config
    from llmosd.tasks import discover

    cfg = load_config({"state_dir": str(tmp_path), "debug_api": True}, {})
    app = make_app(AppState(Live(cfg, "x" * 32), None, None, None, None, tasks=discover()))  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD" and r.resource}
    undeclared = {k for k in served - set(ROUTES) - app[TASK_ROUTES] if k[1] not in PUBLIC}
    assert not undeclared
    assert ("POST", "/v1/embeddings") in app[TASK_ROUTES] and ("POST", "/v1/rerank") in app[TASK_ROUTES]
