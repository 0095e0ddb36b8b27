"""One JSON error shape for every 4xx/5xx: ``{"error": {"type", "message", "param"?}}``."""

from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.close = close  # answer, then close the connection (an unread or unreadable body)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def error_response(
    status: int, message: str, type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body: dict[str, object] = {"type": type, "message": message}
    if param is not None:
        body["param"] = param
    return web.json_response({"error": body}, status=status, headers=headers)


def kserve_error(
    status: int, message: str, type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """KServe v2's error body, ``{"error": "<message>"}``, for the /v2 routes."""
    return web.json_response({"error": message}, status=status, headers=headers)


# Error types for statuses raised by aiohttp itself (routing, body size, methods).
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "unavailable_error",
    504: "timeout_error",
}
