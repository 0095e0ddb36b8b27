"""The console for people: ``GET /`` and its assets, static files shipped in the package (llmosd/console).

Nothing is fetched from elsewhere (the box may have no internet) and the files hold no data: the page
reads the read-scoped routes (/api/stats, /api/status, /api/models) itself, with the token a LAN viewer
enters once. The Content-Security-Policy lets it talk to this origin only."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# The page may load only its own scripts and styles and speak only to this origin; no frames, no forms
# posting elsewhere, no referrer. uPlot styles its elements through the CSSOM, which style-src permits.
SECURITY = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _load() -> dict[str, Asset]:
    """The shipped files, read once (they are small: about 80 kB with the chart library)."""
    folder = resources.files("llmosd").joinpath("console")
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in TYPES:
            body = entry.read_bytes()
            assets[entry.name] = Asset(body, TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return assets


ASSETS = _load()


def _send(request: web.Request, name: str) -> web.Response:
    asset = ASSETS.get(name)
    if asset is None:
        raise web.HTTPNotFound(text=f"no console file {name!r}")
    # no-cache: the browser revalidates (a 304 costs nothing) so an upgraded daemon's page is never stale
    headers = SECURITY | {"ETag": asset.etag, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers=headers | {"Content-Type": asset.content_type})


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return _send(request, "index.html")


@routes.get("/console/{name}")
async def asset(request: web.Request) -> web.Response:
    return _send(request, request.match_info["name"])
