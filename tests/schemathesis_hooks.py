"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS): most generated
cases name a model the daemon really serves (a random name only tests the 404), and generation stays
bounded (max_tokens at most 8), so a thousand cases fit in CI's minutes."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import schemathesis

MODELS = [m for m in os.environ.get("LLMOSD_FUZZ_MODELS", "").split(",") if m]
MAX_TOKENS = 8


def _pick(seed: str, current: Any) -> Any:
    """A real model for 3 cases in 4, chosen by the case's own content (reproducible)."""
    if not MODELS:
        return current
    k = int(hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest(), 16) % (len(MODELS) * 4 // 3 + 1)
    return MODELS[k] if k < len(MODELS) else current


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    params = case.path_parameters or {}
    for key in ("name", "model"):
        if key in params:
            params[key] = _pick(repr(sorted(params.items())), params[key])
    if params.get("version") is not None and _pick(repr(params), None) is not None:
        params["version"] = "1"  # the version the store holds, most of the time
    body = case.body
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = _pick(repr(sorted(body, key=str)) + str(len(str(body))), body["model"])
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 2:
            body["n"] = 2
    return case
