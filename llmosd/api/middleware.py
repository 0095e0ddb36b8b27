"""Request-wide concerns: error shape, access control, request ids."""

from __future__ import annotations

import ipaddress
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from llmosd.api.errors import STATUS_TYPES, ApiError, error_response, kserve_error
from llmosd.api.ratelimit import GRANT_KEY, charge_refusal
from llmosd.api.scopes import SCRAPE, needed, public, route_of
from llmosd.api.state import HELD, state
from llmosd.logs import REQUEST_ID, printable
from llmosd.scheduler import BatcherClosed, InvalidInput, InvalidRequest, QueueFull
from llmosd.scheduler.errors import ModelUnavailable
from llmosd.scheduler.placement import PlacementError
from llmosd.store import InvalidName, NotFound

log = logging.getLogger("llmosd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def remote_address(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:  # a Unix-socket peer has no address
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener's IPv4 client, as the IPv4 networks name it
    return address


def is_local(request: web.Request) -> bool:
    """Unix-socket and loopback clients are trusted; everyone else shows a token."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return True
    address = remote_address(request)
    return address is not None and address.is_loopback


def may_scrape(request: web.Request) -> bool:
    """GET /metrics from a network metrics_scrape_from names: a Prometheus that holds no token."""
    if route_of(request) != SCRAPE:
        return False
    address = remote_address(request)
    return address is not None and any(address in net for net in state(request).config.scrape_networks)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")[:64]
    request_id = given if given.isprintable() and given.isascii() and given else uuid.uuid4().hex[:16]
    REQUEST_ID.set(request_id)  # this handler's task only: its log records carry REQUEST_ID=
    # The Open Inference Protocol defines its own error body, a bare string: tritonclient reads that.
    render = kserve_error if request.path.startswith("/v2") else error_response
    try:
        response = await handler(request)
    except ApiError as exc:
        response = render(exc.status, exc.message, exc.type, exc.param, exc.headers)
        if exc.close:
            response.force_close()
    except NotFound as exc:
        response = render(404, str(exc), "not_found_error", "model")
    except InvalidName as exc:
        response = render(400, str(exc), "invalid_request_error", "model")
    except InvalidRequest as exc:  # a generation request this model cannot run (the prepare step's verdict)
        response = render(400, str(exc), "invalid_request_error", exc.param)
    except InvalidInput as exc:  # an encoder's input it cannot take (too long and not to be cut, bad ids)
        response = render(400, str(exc), "invalid_request_error", "input")
    except QueueFull as exc:
        response = render(429, str(exc), "rate_limit_error", headers={"Retry-After": str(exc.retry_after)})
    except (PlacementError, ModelUnavailable) as exc:
        response = render(503, str(exc), "unavailable_error")
    except BatcherClosed as exc:
        response = render(503, str(exc), "unavailable_error", headers={"Retry-After": "1"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = f"request body too large (limit {state(request).config.max_body_bytes} bytes)"
        # aiohttp's 405 names the methods the path takes in Allow (RFC 9110 requires it): keep it
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = render(exc.status, message or exc.reason, STATUS_TYPES.get(exc.status, "error"), headers=allow)
    except Exception:
        log.exception("internal error in %s %s (request %s)", request.method, printable(request.path), request_id)
        response = render(500, f"internal error (request id {request_id})", "server_error")
    if not response.prepared:  # a stream sent its headers already
        response.headers["X-Request-Id"] = request_id
    return response


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Non-local clients present a bearer token (401 without a valid one) whose scopes include what the
    route needs (403 naming the scope otherwise: ``api/scopes.py``)."""
    if public(request) or is_local(request) or may_scrape(request):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    grant = state(request).live.tokens.grant(presented.strip()) if scheme.lower() == "bearer" else None
    if grant is None:
        charge_refusal(request)  # past the client's rate: a 429, not one more 401 and log line
        # Never log what was presented: a near-miss token is still a secret.
        log.warning(
            "refused %s %s from %s: %s bearer token",
            request.method,
            printable(request.path),
            printable(request.remote),
            "missing" if not presented else "wrong",
        )
        raise ApiError(
            401,
            "a valid bearer token is required from non-local clients",
            type="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    route, scopes = needed(request)
    if not grant.allows(scopes):
        wanted = " or ".join(f"'{s}'" for s in sorted(scopes))
        log.warning(
            "refused %s from %s: token %s lacks the %s scope",
            printable(route),
            printable(request.remote),
            grant.name,
            wanted,
        )
        raise ApiError(
            403, f"this token ({grant.name}) lacks the {wanted} scope that {route} needs", type="permission_error"
        )
    request[GRANT_KEY] = grant.name  # the rate limits count per token
    return await handler(request)


@web.middleware
async def release_held(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Release the models a request held (see ``state.hold``) once its response is complete."""
    try:
        return await handler(request)
    finally:
        for served in request.get(HELD, ()):
            state(request).pool.release(served)
