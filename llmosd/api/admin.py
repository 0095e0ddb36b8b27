"""Management routes over the model store (/api/models)."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from llmosd.api.errors import bad_request
from llmosd.api.state import state
from llmosd.store import check_name

routes = web.RouteTableDef()


@routes.get("/api/models")
async def list_models(request: web.Request) -> web.Response:
    st = state(request)
    loaded = {s.name: s.manifest.version for s in st.pool.served()}
    models = []
    for name in st.store.names():
        versions = st.store.versions(name)
        if versions:
            models.append(
                {
                    "name": name,
                    "versions": versions,
                    "active": st.store.active_version(name),
                    "loaded": loaded.get(name),
                }
            )
    return web.json_response({"models": models})


@routes.get("/api/models/{name}")
async def show_model(request: web.Request) -> web.Response:
    st = state(request)
    name = check_name(request.match_info["name"])
    version = request.query.get("version")
    manifest = st.store.manifest(name, version)
    body = asdict(manifest)
    body["source"] = {k: v for k, v in body["source"].items() if k != "path"}  # no host paths over HTTP
    return web.json_response(body)


@routes.post("/api/models/{name}/tune")
async def tune_model(request: web.Request) -> web.Response:
    """Measure the model's batch sizes again now, cache the profile and switch to it."""
    st = state(request)
    name = check_name(request.match_info["name"])
    try:
        profile = await st.pool.retune(name)
    except TypeError as exc:
        raise bad_request(str(exc), "name") from None
    return web.json_response(profile.as_dict())
