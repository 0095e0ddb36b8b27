"""The aiohttp application: middlewares and the route families."""

from __future__ import annotations

import logging

from aiohttp import web

from llmosd.api import admin, console, debug, lifecycle, metrics, oip, openai, ops, routing, stats
from llmosd.api.connections import CONNECTIONS, Connections, Limits, mark
from llmosd.api.middleware import auth, errors, release_held
from llmosd.api.ratelimit import LIMITS, Buckets, rate_limit
from llmosd.api.scopes import TASK_ROUTES
from llmosd.api.state import STATE, AppState

log = logging.getLogger(__name__)


def make_app(app_state: AppState) -> web.Application:
    app = web.Application(
        middlewares=[mark, metrics.track, errors, auth, rate_limit, routing.route, release_held],
        client_max_size=app_state.config.max_body_bytes,
    )
    app[STATE] = app_state
    app.on_response_prepare.append(routing.add_header)
    app[metrics.METRICS] = metrics.Metrics(app_state)
    app[LIMITS] = Buckets()
    app[lifecycle.PULLS] = lifecycle.Pulls()

    def limits() -> Limits:  # the config of the moment: a reload changes them for every connection
        c = app_state.config
        return Limits(c.header_timeout_s, c.write_timeout_s, c.max_connections_per_client)

    app[CONNECTIONS] = Connections(limits)
    families = (
        openai.routes,
        oip.routes,
        ops.routes,
        lifecycle.routes,
        admin.routes,
        metrics.routes,
        stats.routes,
        console.routes,
    )
    for family in families:  # lifecycle before admin: /api/models/pulls is not a model called "pulls"
        app.add_routes(family)
    if app_state.config.debug_api:
        app.add_routes(debug.routes)
    _add_task_routes(app, app_state)
    return app


def _add_task_routes(app: web.Application, app_state: AppState) -> None:
    """Each installed task's routes; a task that claims a route the daemon serves itself is left out
    whole (the registry already refused one task's route claimed by another)."""
    own = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    added: set[tuple[str, str]] = set()
    for entry in app_state.tasks.entries:
        routes = [r for r in entry.task.routes if isinstance(r, web.RouteDef)]
        if clash := sorted((r.method, r.path) for r in routes if (r.method, r.path) in own):
            log.warning("task %s (%s) left out: %s %s is the daemon's own", entry.task.name, entry.package, *clash[0])
            continue
        app.add_routes(entry.task.routes)
        added |= {(r.method, r.path) for r in routes}
    app[TASK_ROUTES] = frozenset(added)  # inference routes: the 'infer' scope
