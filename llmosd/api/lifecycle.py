"""Versions over HTTP: pull from a registry (with progress), activate a version, roll back. Activation
swaps the store's ``active`` pointer, then the pool: new requests go to the new version at once, the old
one finishes what it holds and unloads."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from llmosd.api.errors import ApiError, bad_request
from llmosd.api.requests import json_body
from llmosd.api.state import state
from llmosd.hub import HubError, HubPull, is_hub_ref, parse_hub_ref
from llmosd.hub import pull as pull_from_hub
from llmosd.registry import DigestMismatch, NotEnoughSpace, RegistryError, parse_reference
from llmosd.registry.signing import SignatureError
from llmosd.scheduler.portable import NotPortable
from llmosd.store import Manifest, NotFound, check_name, check_version
from llmosd.tasks import PRECISIONS
from llmosd.versions import NoOlderVersion

routes = web.RouteTableDef()
KEEP_FINISHED = 20


@dataclass
class PullProgress:
    id: int
    ref: str
    started: float = field(default_factory=time.time)
    status: str = "running"  # running, done, failed
    stage: str = "downloading"  # a Hugging Face pull then: exporting (and validating)
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    finished: float | None = None

    def layer(self, title: str, size: int, have: int) -> Any:
        entry = self.layers[title] = {"size": size, "done": have}

        def step(n: int) -> None:
            entry["done"] += n

        return step

    def file(self, title: str, size: int, have: int) -> None:
        """A file's absolute progress (a Hugging Face download, polled)."""
        self.layers[title] = {"size": size, "done": have}

    def as_dict(self) -> dict[str, Any]:
        done = sum(x["done"] for x in self.layers.values())
        total = sum(x["size"] for x in self.layers.values())
        return {
            "id": self.id,
            "ref": self.ref,
            "status": self.status,
            "stage": self.stage,
            "started": self.started,
            "finished": self.finished,
            "bytes_done": done,
            "bytes_total": total,
            "layers": self.layers,
            "result": self.result,
            "error": self.error,
        }


@dataclass
class Pulls:
    running: dict[int, PullProgress] = field(default_factory=dict)
    finished: list[PullProgress] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def start(self, ref: str) -> PullProgress:
        p = PullProgress(next(self.ids), ref)
        self.running[p.id] = p
        return p

    def end(self, p: PullProgress, status: str) -> None:
        p.status, p.finished = status, time.time()
        self.running.pop(p.id, None)
        self.finished = [*self.finished, p][-KEEP_FINISHED:]


PULLS = web.AppKey("pulls", Pulls)


def _card(m: Manifest) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "task": m.task, "precision": m.precision}


@routes.post("/api/models/pull")
async def pull_model(request: web.Request) -> web.Response:
    """Pull ``{"ref": "REGISTRY/REPO:TAG", "name"?: str, "activate"?: bool}`` into the store; with
    activate (the default) the new version serves at once if the model was being served. A ``hf.co/ORG/REPO``
    reference (with ``task`` and ``precision`` as ``llmosd export`` takes them) is downloaded from Hugging
    Face, exported and validated."""
    st = state(request)
    body = await json_body(request)
    if is_hub_ref(str(body.get("ref", ""))):
        return await _pull_from_hub(request, body)
    try:
        ref = parse_reference(str(body.get("ref", "")))
    except ValueError as exc:
        raise bad_request(str(exc), "ref") from None
    name = check_name(body["name"]) if body.get("name") is not None else None
    activate = body.get("activate", True)
    if not isinstance(activate, bool):
        raise bad_request("activate must be true or false", "activate")
    pulls = request.app[PULLS]
    progress = pulls.start(str(ref))
    try:
        result, served = await st.versions.pull(ref, name=name, activate=activate, progress=progress.layer)
    except SignatureError as exc:
        pulls.end(progress, "failed")
        progress.error = str(exc)
        raise ApiError(403, str(exc), type="permission_error", param="ref") from None
    except NotEnoughSpace as exc:
        pulls.end(progress, "failed")
        progress.error = str(exc)
        raise ApiError(507, str(exc), type="insufficient_storage") from None
    except (RegistryError, DigestMismatch, aiohttp.ClientError, OSError) as exc:
        pulls.end(progress, "failed")
        progress.error = str(exc)
        raise ApiError(502, f"pulling {ref} failed: {exc}", type="upstream_error") from None
    progress.result = _card(result.manifest) | {"digest": result.digest, "status": result.status}
    pulls.end(progress, "done")
    out = progress.result | {
        "fetched_bytes": result.fetched_bytes,
        "from_peers_bytes": result.from_peers,
        "reused_files": result.reused,
        "serving": served,
    }
    return web.json_response(out)


async def _pull_from_hub(request: web.Request, body: dict[str, Any]) -> web.Response:
    st = state(request)
    try:
        ref = parse_hub_ref(str(body["ref"]))
    except ValueError as exc:
        raise bad_request(str(exc), "ref") from None
    for key in ("name", "task", "precision"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise bad_request(f"{key} must be a string", key)
    name = check_name(body["name"]) if body.get("name") is not None else None
    precision = body.get("precision") or "auto"
    if precision not in ("auto", *PRECISIONS):
        raise bad_request(f"precision must be auto or one of {', '.join(PRECISIONS)}", "precision")
    activate = body.get("activate", True)
    if not isinstance(activate, bool):
        raise bad_request("activate must be true or false", "activate")
    pulls = request.app[PULLS]
    progress = pulls.start(str(ref))
    how = HubPull(body.get("task"), precision, name, activate=False)
    try:
        manifest = await pull_from_hub(st.store, ref, st.tasks, how, progress.file, progress)
    except HubError as exc:
        pulls.end(progress, "failed")
        progress.error = str(exc)
        raise ApiError(exc.status, str(exc), type=_HUB_ERRORS.get(exc.status, "upstream_error"), param="ref") from None
    served = False
    if activate:
        served = (await st.versions.activate(manifest.name, manifest.version)).serving
    progress.result = _card(manifest) | {"source": str(ref)}
    pulls.end(progress, "done")
    return web.json_response(
        progress.result | {"validation": manifest.validation.get("figures", {}), "serving": served}
    )


_HUB_ERRORS = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    507: "insufficient_storage",
}


@routes.get("/api/models/pulls")
async def list_pulls(request: web.Request) -> web.Response:
    pulls = request.app[PULLS]
    return web.json_response(
        {"running": [p.as_dict() for p in pulls.running.values()], "finished": [p.as_dict() for p in pulls.finished]}
    )


@routes.post("/api/models/{name}/activate")
async def activate(request: web.Request) -> web.Response:
    """``{"version": "2"}``: make it the active version; it serves at once if the model was served."""
    st = state(request)
    name = check_name(request.match_info["name"])
    body = await json_body(request)
    version = check_version(str(body.get("version", "")))
    try:
        done = await st.versions.activate(name, version)
    except NotFound as exc:
        raise ApiError(404, str(exc), type="not_found_error", param="version") from None
    except NotPortable as exc:  # validated on other CPU kernels, and failed the gate's short form here
        raise ApiError(409, str(exc), type="conflict_error", param="version") from None
    return web.json_response(_card(done.manifest) | {"previous": done.previous, "serving": done.serving})


@routes.post("/api/models/{name}/rollback")
async def rollback(request: web.Request) -> web.Response:
    """Activate the newest version older than the active one."""
    st = state(request)
    name = check_name(request.match_info["name"])
    try:
        done = await st.versions.rollback(name)
    except NotFound as exc:
        raise ApiError(404, str(exc), type="not_found_error", param="name") from None
    except NoOlderVersion as exc:
        raise ApiError(409, str(exc), type="conflict_error") from None
    return web.json_response(_card(done.manifest) | {"previous": done.previous, "serving": done.serving})


@routes.get("/api/blobs/{digest}")
async def blob(request: web.Request) -> web.StreamResponse:
    """A verified file of the store, for LAN peers (the token is required from the LAN, as everywhere)."""
    st = state(request)
    if not st.config.peer_cache:
        raise ApiError(404, "this appliance does not serve its blobs (peer_cache = false)", type="not_found_error")
    digest = request.match_info["digest"]
    try:
        path = st.store.blob_path(digest)
    except ValueError:
        raise bad_request(f"not a sha256 digest: {digest[:80]!r}", "digest") from None
    if not path.is_file():
        found = await asyncio.to_thread(st.store.manifest_file, digest)  # a version's manifest layer
        if found is None:
            raise ApiError(404, f"blob {digest} is not in this store", type="not_found_error", param="digest")
        path = found
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest})
