"""The asynchronous client on aiohttp: the same API as ``Client``, awaited; generation streams are async
iterators. ``async with AsyncClient() as client: model = await client.load_model("...")``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from llmosd.client.errors import DONE, ConnectionFailed, error_from, sse_event
from llmosd.client.pinning import CertificateRefused, KnownHosts, presented_async, settle, untrusted
from llmosd.client.target import Target, local_target, nothing_local, pick
from llmosd.discovery.txt import Appliance


class _Unreachable(OSError):
    """The box did not answer the handshake that reads its certificate: nothing was sent."""


class AsyncClient:
    """Where it connects is decided as ``Client`` decides it, on the first request (or ``connect()``)."""

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
        self.token = token if token is not None else os.environ.get("LLMOSD_TOKEN")
        self.fingerprint = fingerprint or os.environ.get("LLMOSD_FINGERPRINT") or None
        self.known_hosts = KnownHosts(known_hosts)
        self._pins: dict[str, str | None] = {}  # per base URL: the fingerprint held to, or None (CAs)
        self.timeout = timeout
        self.retries = retries
        self._want = (url, socket, name, id, discover_timeout)
        self.target: Target | None = None
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    async def discover(timeout: float = 3.0) -> list[Appliance]:
        from llmosd.discovery.browse import async_discover

        return await async_discover(timeout)

    async def connect(self) -> Target:
        if self.target is None:
            url, socket, name, id, wait = self._want
            target = None if name or id else local_target(url, socket)
            if target is None:
                found = await self.discover(wait)
                if not found and not (name or id):
                    raise ConnectionFailed(f"{nothing_local()}, and no llmosd answered on the LAN")
                target = pick(found, name, id)
            self.target = target
        return self.target

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _http(self) -> tuple[aiohttp.ClientSession, Target]:
        target = await self.connect()
        if self._session is None:
            connector = aiohttp.UnixConnector(path=target.socket) if target.socket else None
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session, target

    async def _ssl(self, target: Target) -> aiohttp.Fingerprint | bool:
        """What the connection to ``target`` is held to (see ``llmosd.client.pinning``)."""
        url = URL(str(target.url))
        if target.socket or url.scheme != "https":
            return True
        where = str(target.url)
        if where not in self._pins:
            try:
                der = await presented_async(url.host or "localhost", url.port or 443, self.timeout)
            except (OSError, TimeoutError) as exc:
                raise _Unreachable(str(exc) or type(exc).__name__) from exc
            self._pins[where] = settle(der, target, self.fingerprint, self.known_hosts)
        pin = self._pins[where]
        return aiohttp.Fingerprint(bytes.fromhex(pin)) if pin else True

    async def _open(self, method: str, path: str, body: dict[str, Any] | None) -> aiohttp.ClientResponse:
        session, target = await self._http()
        headers = {"Accept": "application/json"}
        if self.token and not target.socket:
            headers["Authorization"] = f"Bearer {self.token}"
        attempt = 0
        repinned = False
        while True:
            base = "http://llmosd" if target.socket else str(target.url).rstrip("/")
            try:
                tls = await self._ssl(target)
                response = await session.request(method, base + path, json=body, headers=headers, ssl=tls)
            except aiohttp.ServerFingerprintMismatch as exc:
                if repinned:
                    message = f"{target.where} presents a certificate other than the pinned one"
                    raise CertificateRefused(message) from exc
                repinned = True  # the box renewed its certificate since the pin was settled: settle again
                self._pins.pop(str(target.url), None)
                continue
            except aiohttp.ClientConnectorCertificateError as exc:
                raise ConnectionFailed(untrusted(target.where, exc.certificate_error)) from exc
            except (aiohttp.ClientConnectorError, _Unreachable) as exc:  # nothing was sent: the next address
                following = target.next()
                if following is None:
                    raise ConnectionFailed(f"cannot reach llmosd at {target.where}: {exc}") from exc
                self.target = target = following
                continue
            except (aiohttp.ClientConnectionError, OSError) as exc:
                raise ConnectionFailed(f"lost the connection to llmosd at {target.where}: {exc}") from exc
            if response.status in (429, 503) and attempt < self.retries:
                attempt += 1
                wait = float(response.headers.get("Retry-After") or 1)
                response.release()
                await asyncio.sleep(min(wait, 30.0))
                continue
            if response.status >= 400:
                raw = await response.read()
                response.release()
                raise error_from(response.status, raw)
            return response

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self._open(method, path, body)
        async with response:
            return await response.json()

    async def events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The JSON events of a server-sent-events answer, until ``[DONE]``."""
        response = await self._open("POST", path, body)
        async with response:
            async for raw in response.content:
                event = sse_event(raw)
                if event is DONE:
                    return
                if event is not None:
                    yield event

    # --- the API -------------------------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/models"))["data"])

    async def status(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/api/status"))

    async def hardware(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/api/hardware"))

    async def load_model(self, name: str) -> AsyncModel:
        """A handle on a served model (loaded on demand; ApiError 404 if the store has none)."""
        return AsyncModel(self, await self.request("GET", f"/v1/models/{name}"))


class AsyncModel:
    def __init__(self, client: AsyncClient, card: dict[str, Any]) -> None:
        self.client = client
        self.card = card
        self.name: str = card["id"]
        self.task: str = card.get("task", "")

    def __repr__(self) -> str:
        return f"AsyncModel({self.name!r}, task={self.task!r})"

    async def embed(self, texts: str | list[str], truncate: bool = False) -> list[list[float]]:
        """Embeddings; an input longer than the model takes is refused, or cut there with ``truncate``."""
        body = {"model": self.name, "input": texts, "truncate": truncate}
        return [d["embedding"] for d in (await self.client.request("POST", "/v1/embeddings", body))["data"]]

    async def classify(self, texts: str | list[str]) -> list[dict[str, Any]]:
        body = {"model": self.name, "input": texts}
        return list((await self.client.request("POST", "/v1/classify", body))["data"])

    async def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> list[dict[str, Any]]:
        """The documents best first against ``query``: ``index``, ``relevance_score``, ``document``."""
        body = {"model": self.name, "query": query, "documents": documents, "top_n": top_n}
        return list((await self.client.request("POST", "/v1/rerank", body))["results"])

    async def generate_text(self, prompt: str, *, raw: bool = False, **options: Any) -> str:
        """The model's answer (through its chat template unless ``raw``); see ``stream_text``."""
        if raw or not self.card.get("chat_template", False):
            body = {"model": self.name, "prompt": prompt, **options}
            return str((await self.client.request("POST", "/v1/completions", body))["choices"][0]["text"])
        return await self.chat([{"role": "user", "content": prompt}], **options)

    async def stream_text(self, prompt: str, *, raw: bool = False, **options: Any) -> AsyncIterator[str]:
        """``generate_text`` as it is produced, piece by piece."""
        if raw or not self.card.get("chat_template", False):
            body = {"model": self.name, "prompt": prompt, **options, "stream": True}
            async for e in self.client.events("/v1/completions", body):
                yield e["choices"][0]["text"]
            return
        async for piece in self.stream_chat([{"role": "user", "content": prompt}], **options):
            yield piece

    async def chat(self, messages: list[dict[str, Any]], **options: Any) -> str:
        body = {"model": self.name, "messages": messages, **options}
        reply = await self.client.request("POST", "/v1/chat/completions", body)
        return str(reply["choices"][0]["message"]["content"])

    async def stream_chat(self, messages: list[dict[str, Any]], **options: Any) -> AsyncIterator[str]:
        body = {"model": self.name, "messages": messages, **options, "stream": True}
        async for e in self.client.events("/v1/chat/completions", body):
            if e["choices"]:
                yield e["choices"][0]["delta"].get("content", "")
