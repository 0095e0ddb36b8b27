"""The aiohttp application: middlewares and the route families."""

from __future__ import annotations

from aiohttp import web

from llmosd.api import admin, completions, openai, ops
from llmosd.api.middleware import auth, errors
from llmosd.api.state import STATE, AppState


def make_app(app_state: AppState) -> web.Application:
    app = web.Application(
        middlewares=[errors, auth],
        client_max_size=app_state.config.max_body_bytes,
    )
    app[STATE] = app_state
    for family in (openai.routes, completions.routes, ops.routes, admin.routes):
        app.add_routes(family)
    return app
