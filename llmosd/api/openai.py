"""OpenAI's model listing (/v1/models). Each task's own routes (embeddings, chat, rerank...) come with
the task (``llmosd.tasks``)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

from llmosd.api.routing import local_view
from llmosd.api.state import AppState, hold, state
from llmosd.scheduler import ServedModel
from llmosd.store import Manifest

routes = web.RouteTableDef()


def _created(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def _manifest_card(m: Manifest) -> dict[str, Any]:
    return {
        "id": m.name,
        "object": "model",
        "created": _created(m.created),
        "owned_by": "llmosd",
        "task": m.task,
        "version": m.version,
        "precision": m.precision,
    }


def _model_card(st: AppState, served: ServedModel) -> dict[str, Any]:
    return _manifest_card(served.manifest) | {"devices": served.devices} | st.described(served)


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Loaded models with their devices, then the store's other active models (loaded on first use)."""
    st = state(request)
    cards = [_model_card(st, s) | {"loaded": True} for s in st.pool.served()]
    loaded = {c["id"] for c in cards}

    def stored() -> list[dict[str, Any]]:  # in a thread: a file-system walk, as long as the store is
        names = [n for n in st.store.names() if n not in loaded and st.store.active_version(n)]
        return [_manifest_card(st.store.manifest(n)) | {"loaded": False} for n in names]

    cards += await asyncio.to_thread(stored)
    if request.query.get("reachable", "").lower() in ("1", "true", "yes"):
        cards = _reachable(st, cards)
    return web.json_response({"object": "list", "data": cards})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    """One model's card; a model in the store but not loaded is loaded now (the client's load_model)."""
    served = await hold(request, request.match_info["model"])
    return web.json_response(_model_card(state(request), served) | {"loaded": True})


def _reachable(st: AppState, cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Also what the upstreams serve, each model once: ``route`` is where a request for it would go now
    (its policy's first choice), ``routes`` every way to reach it."""
    remote = st.router.reachable()
    out = []
    for card in cards:
        model = card["id"]
        ways = ["local", *(r for r, _ in remote.pop(model, []))]
        out.append(card | {"route": _first(st, model), "routes": ways})
    for model, reached in sorted(remote.items()):
        ways = [r for r, _ in reached]
        card = {"id": model, "object": "model", "created": 0, "owned_by": ways[0], "loaded": reached[0][1]}
        out.append(card | {"route": _first(st, model), "routes": ways})
    return out


def _first(st: AppState, model: str) -> str:
    plan = st.router.plan(model, st.config.routes.policy(model), local_view(st, model))
    return plan.targets[0] if plan.targets else ""
