"""The Serve ingress in front of the replicas: it takes each HTTP request and sends it to a replica
through a ``DeploymentHandle`` (a streaming one when the client asked for a stream), and sends it again,
to another replica, when the one it went to dies before any of its answer has gone to the client.

Serve's own router retries a request only until a replica has accepted it; one accepted by a replica
that is then killed comes back to the proxy as ``ActorDiedError``, a 500 to the client. Inference
requests change nothing on the replica, so the ingress can safely send them again; what is never sent
twice: a management request (``/api/*``, which may change the store) and a stream already begun (the
client holds part of it: it is cut, so that it does not look complete)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

log = logging.getLogger("llmosd.ray")

# POSTs that change nothing: the inference routes (OpenAI's, TEI's /rerank, the Open Inference Protocol's)
IDEMPOTENT = frozenset(
    ("/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/rerank", "/rerank", "/v1/classify")
)
ATTEMPTS = 4  # a first try and three more, 0.1 s, 0.2 s and 0.4 s apart


def retryable(method: str, path: str) -> bool:
    infer = path in IDEMPOTENT or (path.startswith("/v2/models/") and path.endswith("/infer"))
    return method in ("GET", "HEAD") or (method == "POST" and infer)


def replica_died(exc: BaseException) -> bool:
    """The replica's process is gone or unreachable (not an error of the request itself)."""
    if isinstance(exc, RayTaskError):  # Serve may wrap the death of the actor it called
        return isinstance(exc.cause, RayActorError)
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def failed(status: int, message: str) -> Response:
    body = {"error": {"type": "unavailable_error" if status == 503 else "server_error", "message": message}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def wants_stream(body: bytes) -> bool:
    """Whether a request asks for a streamed answer (``"stream": true``): the body is parsed only when
    it holds the word, so an embeddings request is not read twice."""
    if b'"stream"' not in body:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


class Ingress:
    """The application's ingress: ``Ingress.bind(Replica.bind(...))``."""

    def __init__(self, replica: DeploymentHandle[Any]) -> None:
        self.replica, self.streams = replica, replica.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path, query = request.url.path, request.url.query
        headers = dict(request.headers)  # the replica passes on what the daemon needs of them
        again, streamed = retryable(request.method, path), wants_stream(body)
        for attempt in range(ATTEMPTS):
            stream = None
            try:
                if streamed:
                    call = self.streams.forward.remote(request.method, path, query, headers, body)
                    stream = cast(DeploymentResponseGenerator[Any], call)
                    head: dict[str, Any] = await stream.__anext__()
                    first: bytes = await anext(stream, b"")  # a stream's first chunk (or a whole answer)
                else:
                    head, first = await self.replica.call.remote(request.method, path, query, headers, body)
            except Exception as exc:
                if not replica_died(exc):
                    log.exception("a replica failed on %s %s", request.method, path)
                    return failed(502, f"the replica failed: {type(exc).__name__}")
                if not again or attempt == ATTEMPTS - 1:
                    return failed(503, f"the replica died while answering ({attempt + 1} tries)")
                log.warning("a replica died under %s %s; sent again (try %d)", request.method, path, attempt + 2)
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            answer = dict(head["headers"])
            if attempt:
                answer["X-Llmosd-Retried"] = str(attempt)
            if stream is not None and head["stream"]:
                return StreamingResponse(rest(first, stream), status_code=head["status"], headers=answer)
            if stream is not None:  # asked for a stream, answered whole (an error): read the stream's end
                with contextlib.suppress(Exception):
                    await anext(stream, None)
            return Response(first, status_code=head["status"], headers=answer)
        raise AssertionError("unreachable: the last attempt returns")


async def rest(first: bytes, stream: DeploymentResponseGenerator[Any]) -> AsyncIterator[bytes]:
    """A stream's chunks from the first on. A replica dying now raises here, and the client's connection
    is cut: it holds part of an answer, which must not end as though it were whole."""
    yield first
    async for chunk in stream:
        yield chunk
