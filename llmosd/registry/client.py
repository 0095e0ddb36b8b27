"""The OCI distribution API, spoken directly over aiohttp: manifests by tag or digest, blobs with
``Range`` resume and sha256 checked while streaming, monolithic and chunked uploads, cross-repository
mounts, tag listing; anonymous, basic and bearer-token auth (the ``WWW-Authenticate`` challenge flow)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin

import aiohttp

from llmosd.registry.oci import OCI_MANIFEST, digest_of
from llmosd.registry.throttle import UNLIMITED, Throttle

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MONOLITHIC_MAX = 64 << 20  # larger blobs are uploaded in chunks (PATCH)
PROBE_MAX = 4 << 20  # whether a registry takes a whole blob in its POST is tried with one no larger
MANIFEST_MAX = 4 << 20
Progress = Callable[[int], None]  # bytes moved since the last call


class RegistryError(Exception):
    """The registry refused, or answered something we cannot use."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DigestMismatch(RegistryError):
    """A blob's bytes do not hash to the digest they were asked for by."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def docker_credentials(host: str, config_dir: str | None = None) -> Credentials | None:
    """``auths[host].auth`` from Docker's config.json (``$DOCKER_CONFIG`` or ``~/.docker``)."""
    folder = Path(config_dir or os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        auths = json.loads((folder / "config.json").read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key)
        if isinstance(entry, dict) and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return Credentials(user, password)
    return None


def is_loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or not host.startswith("[") else host[1:].split("]")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE.findall(rest))


class Source(Protocol):
    """What pull and signature checks read from: a ``Registry`` or an OCI-layout archive."""

    host: str

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]: ...

    async def get_blob(
        self, repo: str, digest: str, size: int, dst: Path, progress: Progress | None = None
    ) -> None: ...


class Sink(Source, Protocol):
    """What push and sign write to (sign reads the signatures already there): a ``Registry`` or an
    archive being written."""

    async def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str = ...) -> str: ...

    async def has_blob(self, repo: str, digest: str) -> bool: ...

    async def put_blob(
        self, repo: str, digest: str, src: Path, progress: Progress | None = None, mount_from: str | None = None
    ) -> str: ...


class Registry:
    """One registry host. ``insecure`` (plain HTTP) is allowed for loopback, or when asked for by name."""

    def __init__(
        self,
        host: str,
        session: aiohttp.ClientSession,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        ca_file: str | None = None,
        throttle: Throttle = UNLIMITED,
    ) -> None:
        self.host = host
        self.session = session
        self.credentials = credentials
        scheme = "http" if insecure or is_loopback_host(host) else "https"
        self.base = f"{scheme}://{host}"
        self.ssl: ssl.SSLContext | bool = True
        if ca_file:  # a site's own CA, besides the system's
            self.ssl = ssl.create_default_context()
            self.ssl.load_verify_locations(cafile=ca_file)
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self.throttle = throttle
        self.requests = 0  # counted, for the progress line and tests
        self.single_post: bool | None = None  # whether a monolithic POST completes uploads here

    # ---- auth -------------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        url: str,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        allow_redirects: bool = True,
    ) -> aiohttp.ClientResponse:
        """One request, answering an auth challenge once (basic, or a bearer token from the realm)."""
        for attempt in (1, 2):
            h = dict(headers or {})
            if scope in self._auth:
                h["Authorization"] = self._auth[scope]
            self.requests += 1
            try:
                response = await self.session.request(
                    method, url, headers=h, data=data, ssl=self.ssl, allow_redirects=allow_redirects
                )
            except aiohttp.ClientConnectorCertificateError as exc:
                raise RegistryError(
                    f"{self.host}: its TLS certificate is not trusted ({exc.certificate_error}); "
                    "if a site CA issued it, name that CA's PEM file in registry_ca_file"
                ) from None
            if response.status != 401 or attempt == 2:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            response.release()
            await self._answer(challenge, scope)
        raise AssertionError("unreachable")

    async def _answer(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self.credentials
        basic = f"Basic {base64.b64encode(f'{creds.username}:{creds.password}'.encode()).decode()}" if creds else None
        if scheme == "basic":
            if basic is None:
                raise RegistryError(f"{self.host} wants a user name and password (docker login, or config)", 401)
            self._auth[scope] = basic
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.host} asks for an authentication scheme we do not speak: {challenge!r}", 401)
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope", scope)
        headers = {"Authorization": basic} if basic else {}  # anonymous tokens need none
        async with self.session.get(params["realm"] + "?" + urlencode(query), headers=headers, ssl=self.ssl) as r:
            if r.status != 200:
                raise RegistryError(f"the token service of {self.host} refused us ({r.status})", r.status)
            body = await r.json(content_type=None)
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"the token service of {self.host} sent no token", 401)
        self._auth[scope] = f"Bearer {token}"

    @staticmethod
    def _scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    async def _fail(self, response: aiohttp.ClientResponse, what: str) -> RegistryError:
        text = (await response.text())[:300]
        response.release()
        try:
            errors = json.loads(text).get("errors", [])
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or text
        except ValueError:
            detail = text
        return RegistryError(f"{what}: {self.host} answered {response.status} ({detail})", response.status)

    # ---- manifests and tags ----------------------------------------------------------------------

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        """The manifest's bytes and digest (checked against ``ref`` when it is a digest)."""
        url = f"{self.base}/v2/{repo}/manifests/{ref}"
        r = await self._request("GET", url, self._scope(repo), headers={"Accept": OCI_MANIFEST})
        if r.status != 200:
            raise await self._fail(r, f"manifest {repo}:{ref}")
        raw = await _read_at_most(r, MANIFEST_MAX + 1)
        r.release()
        if len(raw) > MANIFEST_MAX:
            raise RegistryError(f"manifest {repo}:{ref} is larger than {MANIFEST_MAX} bytes")
        digest = digest_of(raw)
        if ref.startswith("sha256:") and digest != ref:
            raise DigestMismatch(f"manifest {repo}@{ref} hashes to {digest}")
        return raw, digest

    async def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str = OCI_MANIFEST) -> str:
        url = f"{self.base}/v2/{repo}/manifests/{ref}"
        r = await self._request(
            "PUT", url, self._scope(repo, push=True), headers={"Content-Type": media_type}, data=raw
        )
        if r.status not in (200, 201):
            raise await self._fail(r, f"pushing manifest {repo}:{ref}")
        r.release()
        return digest_of(raw)

    async def tags(self, repo: str) -> list[str]:
        r = await self._request("GET", f"{self.base}/v2/{repo}/tags/list", self._scope(repo))
        if r.status != 200:
            raise await self._fail(r, f"tags of {repo}")
        body = await r.json(content_type=None)
        r.release()
        return list(body.get("tags") or [])

    # ---- blobs -----------------------------------------------------------------------------------

    async def has_blob(self, repo: str, digest: str) -> bool:
        r = await self._request("HEAD", f"{self.base}/v2/{repo}/blobs/{digest}", self._scope(repo))
        r.release()
        if r.status in (200, 404):
            return r.status == 200
        raise RegistryError(f"blob {digest} in {repo}: {self.host} answered {r.status}", r.status)

    async def get_blob(self, repo: str, digest: str, size: int, dst: Path, progress: Progress | None = None) -> None:
        """Download into ``dst``, resuming from what it already holds (``Range``); the whole file must
        hash to ``digest``, else DigestMismatch and ``dst`` is removed."""

        async def open_blob(headers: dict[str, str]) -> aiohttp.ClientResponse:
            url = f"{self.base}/v2/{repo}/blobs/{digest}"
            r = await self._request("GET", url, self._scope(repo), headers=headers)
            if r.status not in (200, 206):
                raise await self._fail(r, f"blob {digest} of {repo}")
            return r

        await download(open_blob, digest, size, dst, progress, self.throttle)

    async def put_blob(
        self, repo: str, digest: str, src: Path, progress: Progress | None = None, mount_from: str | None = None
    ) -> str:
        """Upload unless the registry has it; "exists", "mounted" or "uploaded"."""
        if await self.has_blob(repo, digest):
            return "exists"
        scope = self._scope(repo, push=True)
        start = f"{self.base}/v2/{repo}/blobs/uploads/"
        size = src.stat().st_size
        octets = {"Content-Type": "application/octet-stream"}
        if mount_from:
            r = await self._request("POST", start + "?" + urlencode({"mount": digest, "from": mount_from}), scope)
            if r.status == 201:
                r.release()
                return "mounted"
        elif size <= MONOLITHIC_MAX and (self.single_post or (self.single_post is None and size <= PROBE_MAX)):
            # the spec's one-request upload, tried first with a small blob: a registry that ignores the
            # body (distribution does) opens a session with 202 instead, and is not sent bodies twice again
            url = start + "?" + urlencode({"digest": digest})
            r = await self._request("POST", url, scope, headers=octets, data=src.read_bytes())
            self.single_post = r.status == 201
            if r.status == 201:
                r.release()
                if progress is not None:
                    progress(size)
                return "uploaded"
        else:
            r = await self._request("POST", start, scope)
        if r.status != 202:
            raise await self._fail(r, f"starting the upload of {digest} to {repo}")
        location = self._location(r)
        r.release()
        if size > MONOLITHIC_MAX:
            location = await self._patch_chunks(location, src, scope, progress)
            data: Any = b""
        else:
            data = src.read_bytes()
        r = await self._request("PUT", _with_query(location, {"digest": digest}), scope, headers=octets, data=data)
        if r.status != 201:
            raise await self._fail(r, f"uploading {digest} to {repo}")
        r.release()
        if progress is not None and size <= MONOLITHIC_MAX:
            progress(size)
        return "uploaded"

    async def _patch_chunks(self, location: str, src: Path, scope: str, progress: Progress | None) -> str:
        offset = 0
        with src.open("rb") as f:
            while chunk := f.read(16 * CHUNK):
                end = offset + len(chunk) - 1
                headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"}
                r = await self._request("PATCH", location, scope, headers=headers, data=chunk)
                if r.status != 202:
                    raise await self._fail(r, "uploading a chunk")
                location = self._location(r)
                r.release()
                offset = end + 1
                if progress is not None:
                    progress(len(chunk))
        return location

    def _location(self, r: aiohttp.ClientResponse) -> str:
        return urljoin(self.base + "/", r.headers.get("Location", ""))


def _with_query(url: str, extra: Mapping[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(extra)


async def download(
    open_blob: Callable[[dict[str, str]], Awaitable[aiohttp.ClientResponse]],
    digest: str,
    size: int,
    dst: Path,
    progress: Progress | None = None,
    throttle: Throttle = UNLIMITED,
) -> None:
    """Stream a blob into ``dst`` from whoever ``open_blob`` asks (a registry, a LAN peer), resuming
    from what ``dst`` holds; the whole file must hash to ``digest``, else DigestMismatch and ``dst`` goes."""
    have = dst.stat().st_size if dst.exists() else 0
    if have > size:
        dst.unlink()
        have = 0
    sha = hashlib.sha256()
    if have:
        with dst.open("rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
    if have < size:
        r = await open_blob({"Range": f"bytes={have}-"} if have else {})
        if r.status == 200 and have:  # the source ignored Range: start over
            sha, have = hashlib.sha256(), 0
            dst.unlink()
        with dst.open("ab") as f:
            try:
                async for chunk in r.content.iter_chunked(CHUNK):
                    have += len(chunk)
                    if have > size:
                        break  # refused below
                    sha.update(chunk)
                    f.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                    await throttle.take(len(chunk))
            finally:
                r.release()
            f.flush()
            os.fsync(f.fileno())
    got = "sha256:" + sha.hexdigest()
    if got != digest or have != size:
        dst.unlink(missing_ok=True)
        raise DigestMismatch(f"blob {digest} arrived as {got} ({have} of {size} bytes): refused")


async def _read_at_most(r: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to ``limit`` bytes. One ``content.read(n)`` returns what has arrived, which over TLS
    can be one record of the body: a pull read a manifest cut at 806 bytes."""
    raw = bytearray()
    while len(raw) < limit and (chunk := await r.content.read(limit - len(raw))):
        raw += chunk
    return bytes(raw)
