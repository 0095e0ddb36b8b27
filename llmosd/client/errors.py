"""Typed client errors carrying the server's own message."""

from __future__ import annotations


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
