"""A synchronous client over ``http.client``: Unix socket, URL or LAN appliance; 429/503 retried per Retry-After."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmosd.client.errors import DONE, ConnectionFailed, error_from, sse_event
from llmosd.client.pinning import (
    CertificateRefused,
    KnownHosts,
    matches,
    pinned_context,
    presented,
    settle,
    untrusted,
    unverified,
)
from llmosd.client.target import local_target, nothing_local, pick
from llmosd.discovery.txt import Appliance


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTPS held to one certificate fingerprint, checked before the request is written."""

    def __init__(self, host: str, port: int | None, timeout: float, pin: str) -> None:
        super().__init__(host, port, timeout=timeout, context=unverified())
        self.pin = pin

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        if not matches(self.sock.getpeercert(binary_form=True), self.pin):
            self.close()
            raise CertificateRefused(f"{self.host}:{self.port} now presents a certificate other than {self.pin}")


class Client:
    """``Client()``: the local socket, else ``LLMOSD_URL``, else the first appliance on the LAN (mDNS);
    or name one with ``socket=`` / ``url=``, or pick a LAN appliance with ``name=`` / ``id=``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        socket: str | Path | None = None,
        token: str | None = None,
        name: str | None = None,
        id: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        discover_timeout: float = 3.0,
        fingerprint: str | None = None,
        known_hosts: Path | None = None,
    ) -> None:
        """``fingerprint``: the SHA-256 of the certificate an https URL must present (else
        ``LLMOSD_FINGERPRINT``; a box found on the LAN is pinned by its record and ``known_hosts``)."""
        self.timeout = timeout
        self.retries = retries
        self.token = token if token is not None else os.environ.get("LLMOSD_TOKEN")
        self.fingerprint = fingerprint or os.environ.get("LLMOSD_FINGERPRINT") or None
        self.known_hosts = KnownHosts(known_hosts)
        self._pins: dict[str, str | None] = {}  # per base URL: the fingerprint held to, or None (CAs)
        target = None if name or id else local_target(url, socket)
        if target is None:
            found = Client.discover(discover_timeout)
            if not found and not (name or id):
                raise ConnectionFailed(f"{nothing_local()}, and no llmosd answered on the LAN")
            target = pick(found, name, id)
        self.target = target

    @staticmethod
    def discover(timeout: float = 3.0) -> list[Appliance]:
        """The appliances on the LAN (mDNS), by name."""
        from llmosd.discovery.browse import discover  # zeroconf only when the LAN is searched

        return discover(timeout)

    @property
    def where(self) -> str:
        return self.target.where

    @property
    def url(self) -> str | None:
        """The base URL connected to (None on the Unix socket)."""
        return self.target.url

    def _pin(self) -> str | None:
        where = str(self.target.url)
        if where not in self._pins:
            url = urlsplit(where)
            der = presented(url.hostname or "localhost", url.port or 443, self.timeout)
            self._pins[where] = settle(der, self.target, self.fingerprint, self.known_hosts)
        return self._pins[where]

    def ssl_context(self) -> ssl.SSLContext:
        """A context for other HTTP clients (the openai SDK's ``httpx.Client(verify=...)``) that trusts
        the box's pinned certificate and nothing else; the system's CAs when no pin applies."""
        if not str(self.target.url).startswith("https://"):
            raise ConnectionFailed(f"{self.where} is not served over TLS")
        url = urlsplit(str(self.target.url))
        der = presented(url.hostname or "localhost", url.port or 443, self.timeout)
        if settle(der, self.target, self.fingerprint, self.known_hosts) is None:
            return ssl.create_default_context()
        return pinned_context(der)

    def _connection(self) -> http.client.HTTPConnection:
        if self.target.socket:
            return _UnixConnection(self.target.socket, self.timeout)
        url = urlsplit(str(self.target.url))
        host = url.hostname or "localhost"
        if url.scheme != "https":
            return http.client.HTTPConnection(host, url.port, timeout=self.timeout)
        pin = self._pin()
        if pin is None:
            context = ssl.create_default_context()
            return http.client.HTTPSConnection(host, url.port, timeout=self.timeout, context=context)
        return _PinnedConnection(host, url.port, self.timeout, pin)

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[Any, http.client.HTTPResponse]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token and not self.target.socket:
            headers["Authorization"] = f"Bearer {self.token}"
        attempt = 0
        repinned = False
        while True:
            conn: http.client.HTTPConnection | None = None
            try:
                conn = self._connection()
                conn.connect()
            except CertificateRefused:
                if repinned or self._pins.pop(str(self.target.url), None) is None:
                    raise
                repinned = True  # the box renewed its certificate since the pin was settled: settle again
                continue
            except ssl.SSLCertVerificationError as exc:
                raise ConnectionFailed(untrusted(self.where, exc)) from exc
            except OSError as exc:  # nothing was sent: the appliance's next address, if it has one
                if conn is not None:
                    conn.close()
                following = self.target.next()
                if following is None:
                    raise ConnectionFailed(f"cannot reach llmosd at {self.where}: {exc}") from exc
                self.target = following
                continue
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
            except OSError as exc:
                conn.close()
                raise ConnectionFailed(f"lost the connection to llmosd at {self.where}: {exc}") from exc
            if response.status in (429, 503) and attempt < self.retries:
                attempt += 1
                wait = float(response.getheader("Retry-After") or 1)
                response.read()
                conn.close()
                time.sleep(min(wait, 30.0))
                continue
            if response.status >= 400:
                raw = response.read()
                conn.close()
                raise error_from(response.status, raw)
            return conn, response

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn, response = self._open(method, path, body)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    def events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON events of a server-sent-events answer, until ``[DONE]``."""
        conn, response = self._open("POST", path, body)
        try:
            for raw in response:
                event = sse_event(raw)
                if event is DONE:
                    return
                if event is not None:
                    yield event
        finally:
            conn.close()

    # --- the API -------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/models")["data"])

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/api/status"))

    def hardware(self) -> dict[str, Any]:
        return dict(self.request("GET", "/api/hardware"))

    def load_model(self, name: str) -> Model:
        """A handle on a served model (raises ApiError 404 if it is not served)."""
        return Model(self, self.request("GET", f"/v1/models/{name}"))


class Model:
    def __init__(self, client: Client, card: dict[str, Any]) -> None:
        self.client = client
        self.card = card
        self.name: str = card["id"]
        self.task: str = card.get("task", "")

    def __repr__(self) -> str:
        return f"Model({self.name!r}, task={self.task!r})"

    def embed(self, texts: str | list[str], truncate: bool = False) -> list[list[float]]:
        """Embeddings; an input longer than the model takes is refused, or cut there with ``truncate``."""
        body = {"model": self.name, "input": texts, "truncate": truncate}
        return [d["embedding"] for d in self.client.request("POST", "/v1/embeddings", body)["data"]]

    def classify(self, texts: str | list[str]) -> list[dict[str, Any]]:
        return list(self.client.request("POST", "/v1/classify", {"model": self.name, "input": texts})["data"])

    def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> list[dict[str, Any]]:
        """The documents best first against ``query``: ``index``, ``relevance_score``, ``document``."""
        body = {"model": self.name, "query": query, "documents": documents, "top_n": top_n}
        return list(self.client.request("POST", "/v1/rerank", body)["results"])

    def generate_text(self, prompt: str, *, stream: bool = False, raw: bool = False, **options: Any) -> Any:
        """The model's answer to ``prompt``: through its chat template (as Ollama's generate does), or
        the bare continuation with ``raw=True``. ``stream=True`` returns an iterator of text pieces.
        ``options`` are OpenAI sampling fields (max_tokens, temperature, top_p, seed, stop, …)."""
        if raw or not self.card.get("chat_template", False):
            body = {"model": self.name, "prompt": prompt, **options}
            if stream:
                return (
                    e["choices"][0]["text"] for e in self.client.events("/v1/completions", {**body, "stream": True})
                )
            return self.client.request("POST", "/v1/completions", body)["choices"][0]["text"]
        return self.chat([{"role": "user", "content": prompt}], stream=stream, **options)

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **options: Any) -> Any:
        """The assistant's reply to ``messages``; ``stream=True`` returns an iterator of text pieces."""
        body = {"model": self.name, "messages": messages, **options}
        if stream:
            events = self.client.events("/v1/chat/completions", {**body, "stream": True})
            return (e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        return self.client.request("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]
