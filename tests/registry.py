"""Test helpers: Debian's `docker-registry` (the reference distribution implementation) started on
loopback, plain or with htpasswd basic auth, and a proxy in front of it that can cut a download."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

CONFIG = """version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {addr}:{port}
  secret: llmosd-test
{auth}"""

AUTH = """auth:
  htpasswd:
    realm: llmosd-test
    path: {htpasswd}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RegistryProcess:
    host: str  # 127.0.0.1:PORT
    root: Path  # its storage
    log: Path

    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


@contextmanager
def docker_registry(
    workdir: Path,
    user: str | None = None,
    password: str | None = None,
    prefix: tuple[str, ...] = (),
    addr: str = "127.0.0.1",
) -> Iterator[RegistryProcess]:
    """``prefix`` runs it under another command (``ip netns exec NS``), listening on ``addr``."""
    binary = shutil.which("docker-registry")
    if binary is None:
        import os

        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail("docker-registry is missing; .ci/run installs it")
        pytest.skip("Debian's docker-registry is not installed (apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    auth = ""
    if user is not None:
        import bcrypt

        hashed = bcrypt.hashpw((password or "").encode(), bcrypt.gensalt(rounds=5)).decode()
        (workdir / "htpasswd").write_text(f"{user}:{hashed}\n")
        auth = AUTH.format(htpasswd=workdir / "htpasswd")
    config = workdir / "config.yml"
    config.write_text(CONFIG.format(root=workdir / "data", addr=addr, port=port, auth=auth))
    log = workdir / "registry.log"
    proc = subprocess.Popen([*prefix, binary, "serve", str(config)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if prefix:  # another namespace: its log says when it listens
                    if "listening on" not in log.read_text():
                        raise OSError("not yet")
                else:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:  # 401: up, and wants credentials
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield RegistryProcess(f"{addr}:{port}", workdir / "data", log)
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class CuttingProxy:
    """Forwards to the registry; while ``cut_after`` is set, the first blob download it carries is
    dropped after that many bytes. Records every request's Range header."""

    upstream: str
    cut_after: int | None = None
    ranges: list[str | None] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        if "/blobs/sha256:" in request.path and request.method == "GET":
            self.ranges.append(request.headers.get("Range"))
        async with (
            ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                f"http://{self.upstream}{request.path_qs}",
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as up,
        ):
            passed = {k: v for k, v in up.headers.items() if k.lower() != "transfer-encoding"}
            out = web.StreamResponse(status=up.status, headers=passed)
            await out.prepare(request)
            sent = 0
            cut = self.cut_after if "/blobs/sha256:" in request.path and request.method == "GET" else None
            async for chunk in up.content.iter_chunked(1 << 16):
                if cut is not None and sent + len(chunk) > cut:
                    await out.write(chunk[: cut - sent])
                    self.cut_after = None  # once
                    assert request.transport is not None
                    request.transport.close()  # the connection drops mid-blob
                    return out
                await out.write(chunk)
                sent += len(chunk)
            await out.write_eof()
            return out


async def start_proxy(proxy: CuttingProxy) -> web.AppRunner:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    proxy.port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    return runner
