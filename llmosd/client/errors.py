"""Typed client errors carrying the server's own message."""

from __future__ import annotations

import json
from typing import Any


class LlmosdError(Exception):
    pass


class ConnectionFailed(LlmosdError):
    """No daemon answered where the client looked."""


class ApiError(LlmosdError):
    def __init__(self, status: int, type: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.param = param


def error_from(status: int, raw: bytes) -> ApiError:
    """The server's error body (one shape for every 4xx/5xx) as an ApiError."""
    try:
        err = json.loads(raw)["error"]
        return ApiError(status, err.get("type", "error"), err.get("message", ""), err.get("param"))
    except (ValueError, KeyError, TypeError):
        return ApiError(status, "error", raw[:200].decode(errors="replace"))


DONE: dict[str, Any] = {}  # what sse_event returns for the stream's end


def sse_event(raw: bytes) -> dict[str, Any] | None:
    """One line of a server-sent-events answer: its JSON event, DONE at ``[DONE]``, None for other lines.
    An error event mid-stream raises ApiError."""
    line = raw.decode().strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    event: dict[str, Any] = json.loads(data)
    if "error" in event:
        err = event["error"]
        raise ApiError(500, err.get("type", "server_error"), err.get("message", ""))
    return event
