"""The routing middleware: a request for a model goes where the router's plan says, and says where it
went (``X-Llmosd-Route``, the journal, ``llmosd_routed_requests``). With every policy ``local`` (the
default) it only sets the header: no body is read twice, nothing else runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from llmosd.api.decode import decode_json_off_loop
from llmosd.api.errors import ApiError
from llmosd.api.metrics import MODEL_KEY, NOT_SERVED, model_label
from llmosd.api.ratelimit import STREAMS_KEY
from llmosd.api.requests import JSON_BODY, RAW_BODY, read_body
from llmosd.api.scopes import route_of
from llmosd.api.state import AppState, state
from llmosd.routing.policy import LOCAL, Local, Plan
from llmosd.routing.proxy import HOP, NotAccepted, UpstreamFailed
from llmosd.routing.usage import Tally
from llmosd.scheduler import QueueFull
from llmosd.store import InvalidName, StoreError

log = logging.getLogger("llmosd.routing")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEADER = "X-Llmosd-Route"
ROUTE_KEY = "llmosd.route"  # request key: the route the request took (or was last tried)
# the inference routes that name their model in a JSON body: what can be answered elsewhere
ROUTED = frozenset(
    ("POST", p) for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/classify")
)
GENERATING = frozenset(("/v1/chat/completions", "/v1/completions"))  # their answers' tokens are counted
LOAD_BYTES_PER_S = 150e6  # a first load's estimate (hashing and session creation) when none was measured


def local_view(st: AppState, model: str) -> Local:
    if st.pool.serves(model):
        return Local(stored=True, loaded=True, load_s=0.0)
    try:
        if not st.store.active_version(model):
            return Local(stored=False, loaded=False, load_s=0.0)
        measured = st.pool.load_seconds.get(model)
        if measured is None:
            measured = sum(f.size for f in st.store.manifest(model).files) / LOAD_BYTES_PER_S
    except (InvalidName, StoreError):
        return Local(stored=False, loaded=False, load_s=0.0)
    return Local(stored=True, loaded=False, load_s=measured)


@web.middleware
async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
    if route_of(request) not in ROUTED:
        return await handler(request)
    request[ROUTE_KEY] = LOCAL
    try:
        return await _route(request, handler)
    finally:
        if (taken := request.get(ROUTE_KEY)) is not None:  # none: no route was tried
            label = model_label(request) if taken == LOCAL else request.get(MODEL_KEY, NOT_SERVED)
            state(request).router.routed[(label or NOT_SERVED, taken)] += 1


async def _route(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = state(request)
    table = st.config.routes
    if not table.routes_anything or HOP in request.headers:  # a forwarded request is answered here
        return await handler(request)
    body = request[RAW_BODY] = await read_body(request)
    doc = request[JSON_BODY] = await decode_json_off_loop(body)
    model = doc.get("model") if isinstance(doc, dict) else None
    policy = table.policy(model) if isinstance(model, str) and model else LOCAL
    if policy == LOCAL:  # the handler also gives the 400 for a body without a model
        return await handler(request)
    assert isinstance(model, str)
    here = local_view(st, model)
    p = st.router.plan(model, policy, here)
    if p.targets == (LOCAL,) and not here.stored and (down := st.router.down_with(model)):
        del request[ROUTE_KEY]
        raise ApiError(
            503,
            f"model {model!r} is not on this box, and the upstreams that serve it are down: {', '.join(down)}",
            type="unavailable_error",
            param="model",
            headers={"Retry-After": "5"},
        )
    if p.load_here:
        _load_here(st, model)
    return await _attempt(request, handler, st, model, p)


async def _attempt(request: web.Request, handler: Handler, st: AppState, model: str, p: Plan) -> web.StreamResponse:
    refused: list[NotAccepted] = []
    for i, target in enumerate(p.targets):
        request[ROUTE_KEY] = target
        more = i + 1 < len(p.targets)
        if target == LOCAL:
            try:
                return await handler(request)
            except QueueFull:
                if not more:
                    raise
                log.info("routing: %s: the local queue is full; overflowing to %s", model, p.targets[i + 1])
                continue
        request[MODEL_KEY] = model  # an upstream listed it: a bounded label
        tally = Tally() if request.path in GENERATING else None
        if tally is not None:  # what the upstream generates counts against the client's token limit
            request[STREAMS_KEY] = [tally]
        try:
            response = await st.router.forward(request, request[RAW_BODY], target, tally)
        except NotAccepted as exc:
            refused.append(exc)
            log.info("routing: %s: %s did not take it (%s)%s", model, target, exc.why, "; trying the next" * more)
            continue
        except UpstreamFailed as exc:
            raise ApiError(exc.status, exc.message, type=exc.type) from None
        finally:
            if tally is not None and tally.completion_tokens:
                st.router.generated[(model, target)] += tally.completion_tokens
        if i == 0:
            log.info("routing: %s to %s (%s)", model, target, p.reason)
        return response
    if not p.targets:
        del request[ROUTE_KEY]
    raise _nowhere(model, p, refused)


def _nowhere(model: str, p: Plan, refused: list[NotAccepted]) -> ApiError:
    if not refused:
        return ApiError(
            503,
            f"model {model!r} is routed remotely ({p.reason}), and no upstream that is up lists it",
            type="unavailable_error",
            param="model",
        )
    why = "; ".join(str(r) for r in refused)
    busy = [r for r in refused if r.status == 429]
    status = 429 if busy else 503
    retry = (busy or refused)[-1].retry_after or "1"
    return ApiError(
        status,
        f"no route took the request for model {model!r}: {why}",
        type="rate_limit_error" if busy else "unavailable_error",
        headers={"Retry-After": retry},
    )


def _load_here(st: AppState, model: str) -> None:
    """While the first requests go to a peer, load the model here, so the next ones are local."""
    loads = st.router.loads
    if any(t.get_name() == model for t in loads):
        return

    async def load() -> None:
        try:
            await st.pool.load(model)
        except Exception as exc:  # the request went elsewhere; the journal says why it could not come here
            log.warning("routing: loading %s here failed: %s", model, exc)

    task = asyncio.create_task(load(), name=model)
    loads.add(task)
    task.add_done_callback(loads.discard)


async def add_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer of a routed path says where it came from (errors too)."""
    if (taken := request.get(ROUTE_KEY)) is not None:
        response.headers[HEADER] = taken
