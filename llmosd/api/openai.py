"""OpenAI's model listing (/v1/models). Each task's own routes (embeddings, chat, rerank...) come with
the task (``llmosd.tasks``)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

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
    return web.json_response({"object": "list", "data": cards})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    """One model's card; a model in the store but not loaded is loaded now (the client's load_model)."""
    served = await hold(request, request.match_info["model"])
    return web.json_response(_model_card(state(request), served) | {"loaded": True})
