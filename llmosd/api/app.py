"""The aiohttp application: middlewares and the route families."""

from __future__ import annotations

from aiohttp import web

from llmosd.api import admin, completions, debug, lifecycle, metrics, oip, openai, ops, rerank
from llmosd.api.connections import CONNECTIONS, Connections, Limits, mark
from llmosd.api.middleware import auth, errors, release_held
from llmosd.api.state import STATE, AppState


def make_app(app_state: AppState) -> web.Application:
    app = web.Application(
        middlewares=[mark, metrics.track, errors, auth, release_held],
        client_max_size=app_state.config.max_body_bytes,
    )
    app[STATE] = app_state
    app[metrics.METRICS] = metrics.Metrics(app_state)
    app[lifecycle.PULLS] = lifecycle.Pulls()

    def limits() -> Limits:  # the config of the moment: a reload changes them for every connection
        c = app_state.config
        return Limits(c.header_timeout_s, c.write_timeout_s, c.max_connections_per_client)

    app[CONNECTIONS] = Connections(limits)
    families = (
        openai.routes,
        rerank.routes,
        completions.routes,
        oip.routes,
        ops.routes,
        lifecycle.routes,
        admin.routes,
        metrics.routes,
    )
    for family in families:  # lifecycle before admin: /api/models/pulls is not a model called "pulls"
        app.add_routes(family)
    if app_state.config.debug_api:
        app.add_routes(debug.routes)
    return app
