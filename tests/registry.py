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
{tls}{auth}"""

TLS = """  tls:
    certificate: {cert}
    key: {key}
"""

AUTH = """auth:
  htpasswd:
    realm: llmosd-test
    path: {htpasswd}
"""

TOKEN_AUTH = """auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {cert}
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
    token: TokenIssuer | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[RegistryProcess]:
    """``prefix`` runs it under another command (``ip netns exec NS``), listening on ``addr``; with
    ``token`` the registry wants bearer tokens from that issuer (the distribution spec's token auth)."""
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
    if token is not None:
        realm = f"http://127.0.0.1:{token.port}/token"
        auth = TOKEN_AUTH.format(realm=realm, service=token.service, issuer=token.issuer, cert=token.cert)
    config = workdir / "config.yml"
    tls_block = TLS.format(cert=tls[0], key=tls[1]) if tls else ""
    config.write_text(CONFIG.format(root=workdir / "data", addr=addr, port=port, auth=auth, tls=tls_block))
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


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """Run ``app`` on a free loopback port; the runner (to clean up) and the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    return runner, port


async def start_proxy(proxy: CuttingProxy) -> web.AppRunner:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner, proxy.port = await serve_on_loopback(app)
    return runner


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    """A token service as the distribution spec describes (what Docker Hub, GHCR and Harbor run): it
    checks a user name and password (basic auth) and answers with a JWT, signed ES256 with a key whose
    self-signed certificate the registry trusts, granting the scopes asked for. Records what it granted."""

    workdir: Path
    user: str
    password: str
    service: str = "llmosd-test-registry"
    issuer: str = "llmosd-test-issuer"
    port: int = 0
    granted: list[list[str]] = field(default_factory=list)
    refused: int = 0

    def __post_init__(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert = self.workdir / "token-cert.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.der = cert.public_bytes(serialization.Encoding.DER)

    def _jwt(self, access: list[dict[str, object]]) -> str:
        import base64
        import json
        import uuid

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": self.user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    async def handle(self, request: web.Request) -> web.Response:
        import base64

        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") != expected or request.query.get("service") != self.service:
            self.refused += 1
            return web.json_response({"details": "bad credentials"}, status=401)
        scopes = request.query.getall("scope", [])
        access: list[dict[str, object]] = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        # recorded with sorted actions: distribution 2.8 writes "push,pull" or "pull,push" from one
        # challenge to the next (map order), and the order means nothing
        self.granted.append([f"{k}:{n}:{','.join(sorted(a.split(',')))}" for k, n, a in (s.split(":") for s in scopes)])
        token = self._jwt(access)
        return web.json_response({"token": token, "access_token": token, "expires_in": 300})

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/token", self.handle)
        runner, self.port = await serve_on_loopback(app)
        return runner


def site_ca(workdir: Path, ip: str) -> tuple[Path, Path, Path]:
    """A site's own CA and a server certificate it issued for ``ip``: (ca.pem, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, ca: bool
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmosd test site CA")])
    ca_cert = cert("llmosd test site CA", ca_key, ca_name, ca_key, ca=True)
    server = cert(ip, server_key, ca_name, ca_key, ca=False)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths
