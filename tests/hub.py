"""A stand-in for the Hugging Face hub, the one fake the pull tests may use (there is no hub here): a real
aiohttp server on loopback that serves folders in the hub's routes, as huggingface_hub calls them through
``HF_ENDPOINT`` — the model API (``/api/models/ORG/REPO/revision/REV``) and file resolution
(``/ORG/REPO/resolve/REV/PATH``, HEAD and GET with ranges) — with the hub's error headers for gated and
missing repositories. It records every file it sends."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.conftest import free_port


@dataclass
class FakeHub:
    repos: dict[str, Path] = field(default_factory=dict)  # "ORG/REPO" -> its folder
    gated: set[str] = field(default_factory=set)
    sent: list[str] = field(default_factory=list)  # "ORG/REPO/PATH" of every GET of a file
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def commit(folder: Path) -> str:
        """A revision's commit id: 40 hex digits, from the folder's files (a new file is a new commit)."""
        h = hashlib.sha1()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(folder)).encode() + hashlib.sha1(p.read_bytes()).digest())
        return h.hexdigest()

    def _repo(self, request: web.Request) -> tuple[str, Path]:
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        if repo in self.gated:
            raise web.HTTPForbidden(
                headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."}
            )
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if request.match_info["rev"] not in ("main", self.commit(self.repos[repo])):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        return repo, self.repos[repo]

    async def info(self, request: web.Request) -> web.Response:
        repo, folder = self._repo(request)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        siblings = [{"rfilename": str(p.relative_to(folder)), "size": p.stat().st_size} for p in files]
        return web.json_response({"id": repo, "modelId": repo, "sha": self.commit(folder), "siblings": siblings})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo, folder = self._repo(request)
        path = (folder / request.match_info["path"]).resolve()
        if not path.is_file() or not path.is_relative_to(folder.resolve()):
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        if request.method == "GET":
            self.sent.append(f"{repo}/{request.match_info['path']}")
        etag = hashlib.sha256(path.read_bytes()).hexdigest()
        headers = {"X-Repo-Commit": self.commit(folder), "ETag": f'"{etag}"'}
        return web.FileResponse(path, headers=headers)


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """The hub on a loopback port, in a thread of its own, for as long as the block runs."""
    app = web.Application()
    app.router.add_get("/api/models/{org}/{repo}/revision/{rev}", hub.info)
    app.router.add_get("/{org}/{repo}/resolve/{rev}/{path:.+}", hub.resolve)
    hub.port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", hub.port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fake-hub", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield hub
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
