"""Management routes over the model store (/api/models)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from aiohttp import web

from llmosd.api.errors import bad_request
from llmosd.api.requests import json_body
from llmosd.api.state import AppState, state
from llmosd.scheduler import GenerationEngine, merge_defaults
from llmosd.store import Manifest, check_name

routes = web.RouteTableDef()


@routes.get("/api/models")
async def list_models(request: web.Request) -> web.Response:
    st = state(request)
    loaded = {s.name: s.manifest.version for s in st.pool.served()}
    return web.json_response({"models": await asyncio.to_thread(_stored, st, loaded)})


def _stored(st: AppState, loaded: dict[str, str]) -> list[dict[str, Any]]:
    """Every stored model and its versions (in a thread: a file-system walk, as long as the store is)."""
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
    return models


@routes.get("/api/models/{name}")
async def show_model(request: web.Request) -> web.Response:
    st = state(request)
    name = check_name(request.match_info["name"])
    version = request.query.get("version")
    return web.json_response(await asyncio.to_thread(_shown, st, name, version))


def _shown(st: AppState, name: str, version: str | None) -> dict[str, Any]:
    manifest = st.store.manifest(name, version)
    body = asdict(manifest)
    body["source"] = {k: v for k, v in body["source"].items() if k != "path"}  # no host paths over HTTP
    if manifest.task == "text-generation":
        body["sampling"] = _sampling(st, manifest)
    return body


def _sampling(st: AppState, manifest: Manifest) -> dict[str, Any]:
    """The defaults a request's absent sampling fields take: the manifest's, then those set."""
    own = dict(manifest.runtime.get("sampling") or {})
    chosen = st.store.sampling(manifest.name)
    return {"model": own, "set": chosen, "defaults": own | chosen}


@routes.post("/api/models/{name}/sampling")
async def set_sampling(request: web.Request) -> web.Response:
    """Change a model's default sampling (Ollama's Modelfile PARAMETER): ``{"sampling": {KEY: VALUE or
    null}}``, null unsetting; kept in the store for every version, applied at once where it serves."""
    st = state(request)
    name = check_name(request.match_info["name"])
    manifest = await asyncio.to_thread(st.store.manifest, name)
    if manifest.task != "text-generation":
        raise bad_request(f"model {name!r} is a {manifest.task} model: it does not sample", "name")
    changes = (await json_body(request)).get("sampling")
    if not isinstance(changes, dict) or not changes:
        raise bad_request("'sampling' must be an object of parameters (null unsets one)", "sampling")
    try:
        values = merge_defaults(await asyncio.to_thread(st.store.sampling, name), changes)
    except ValueError as exc:
        raise bad_request(str(exc), "sampling") from None
    await asyncio.to_thread(st.store.set_sampling, name, values)
    for served in st.pool.served():
        if served.name == name:
            for instance in served.instances:
                if isinstance(instance.worker, GenerationEngine):
                    own = dict(served.manifest.runtime.get("sampling") or {})
                    instance.worker.model.sampling_defaults = own | values
    return web.json_response({"name": name, **_sampling(st, manifest)})


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
