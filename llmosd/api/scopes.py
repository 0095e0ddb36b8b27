"""The scope each route needs from a non-local client's token (``llmosd.tokens``): one table, so a route
without a line here is found by a test, and at run time needs ``admin`` (closed by default)."""

from __future__ import annotations

from aiohttp import web

INFER = frozenset({"infer"})
READ = frozenset({"read"})
ADMIN = frozenset({"admin"})
EITHER = INFER | READ  # what apps read before inferring (the model list, OIP metadata) and people read too

ROUTES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/v1/models"): EITHER,
    ("GET", "/v1/models/{model}"): EITHER,
    ("POST", "/v1/chat/completions"): INFER,
    ("POST", "/v1/completions"): INFER,
    ("GET", "/v2"): EITHER,
    ("GET", "/v2/health/live"): EITHER,
    ("GET", "/v2/health/ready"): EITHER,
    ("GET", "/v2/models/{name}"): EITHER,
    ("GET", "/v2/models/{name}/ready"): EITHER,
    ("GET", "/v2/models/{name}/versions/{version}"): EITHER,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): EITHER,
    ("POST", "/v2/models/{name}/infer"): INFER,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): INFER,
    ("GET", "/api/status"): READ,
    ("GET", "/api/hardware"): READ,
    ("GET", "/api/models"): READ,
    ("GET", "/api/models/{name}"): READ,
    ("GET", "/api/models/pulls"): READ,
    ("GET", "/api/tasks"): READ,
    ("GET", "/api/blobs/{digest}"): READ,  # verified model files, for LAN peers
    ("GET", "/metrics"): READ,
    ("GET", "/api/stats"): READ,  # the console's charts
    ("GET", "/openapi.json"): READ,
    ("POST", "/api/models/pull"): ADMIN,
    ("POST", "/api/models/{name}/activate"): ADMIN,
    ("POST", "/api/models/{name}/rollback"): ADMIN,
    ("POST", "/api/models/{name}/sampling"): ADMIN,
    ("POST", "/api/models/{name}/tune"): ADMIN,
    ("POST", "/api/debug/block-loop"): ADMIN,
    ("POST", "/api/debug/fault"): ADMIN,
}
# No token at all: probes reveal nothing, and the console's page and assets are static files with no data
# in them (the page asks for a token, then reads the read-scoped routes with it).
PUBLIC = frozenset({"/healthz", "/readyz", "/", "/console/{name}"})
SCRAPE = ("GET", "/metrics")  # what metrics_scrape_from opens to its networks without a token
TASK_ROUTES = web.AppKey("task_routes", frozenset)  # the installed tasks' (method, path): inference routes


def route_of(request: web.Request) -> tuple[str, str] | None:
    """The matched route as (METHOD, canonical path), HEAD as GET; None when no route matched. The route
    and not the path decides, so no spelling of a path reaches a route without its scope."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return ("GET" if request.method == "HEAD" else request.method), resource.canonical


def public(request: web.Request) -> bool:
    route = route_of(request)
    return route is not None and route[0] == "GET" and route[1] in PUBLIC


def needed(request: web.Request) -> tuple[str, frozenset[str]]:
    """The route as ``METHOD /path`` and the scopes any of which lets a token call it."""
    route = route_of(request)
    if route is None:  # no such route (a 404 or 405 follows): any valid token may learn that
        return request.path, INFER | READ | ADMIN
    method, path = route
    if (method, path) in request.app.get(TASK_ROUTES, frozenset()):
        return f"{method} {path}", INFER
    return f"{method} {path}", ROUTES.get((method, path), ADMIN)
