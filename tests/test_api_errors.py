"""Bad input gets a clear 4xx in the one error shape, and the daemon keeps serving."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import DEFAULT, Daemon

CASES = [
    ("malformed-json", b'{"model": "x", "input": ', 400, "not valid JSON"),
    ("not-an-object", b'["a"]', 400, "JSON object"),
    ("empty-body", b"", 400, "empty"),
    ("non-utf8", b'{"model": "all-minilm-l6-v2", "input": "\xff\xfe"}', 400, "UTF-8"),
    ("no-model", b'{"input": "hi"}', 400, "'model' is required"),
    ("model-not-string", b'{"model": 3, "input": "hi"}', 400, "'model'"),
    ("unknown-model", b'{"model": "nope", "input": "hi"}', 404, "not loaded"),
    ("traversal-model", b'{"model": "../../etc/passwd", "input": "hi"}', 404, "not loaded"),
    ("no-input", b'{"model": "all-minilm-l6-v2"}', 400, "'input' is required"),
    ("empty-list", b'{"model": "all-minilm-l6-v2", "input": []}', 400, "non-empty"),
    ("empty-string", b'{"model": "all-minilm-l6-v2", "input": ""}', 400, "input 0 is empty"),
    ("wrong-type", b'{"model": "all-minilm-l6-v2", "input": {"a": 1}}', 400, "'input'"),
    ("mixed-list", b'{"model": "all-minilm-l6-v2", "input": ["a", 3]}', 400, "'input'"),
    ("mixed-token-arrays", b'{"model": "all-minilm-l6-v2", "input": [[1, 2], "a"]}', 400, "'input'"),
    ("ids-outside-vocab", b'{"model": "all-minilm-l6-v2", "input": [101, 999999, 102]}', 400, "outside the vocabulary"),
    ("negative-ids", b'{"model": "all-minilm-l6-v2", "input": [[101, -5, 102]]}', 400, "outside the vocabulary"),
    ("too-long", b'{"model": "all-minilm-l6-v2", "input": "' + b"word " * 600 + b'"}', 400, "'truncate': true"),
    ("bad-truncate", b'{"model": "all-minilm-l6-v2", "input": "a", "truncate": "yes"}', 400, "'truncate'"),
    ("bad-format", b'{"model": "all-minilm-l6-v2", "input": "a", "encoding_format": "hex"}', 400, "encoding_format"),
    (
        "bad-dimensions",
        b'{"model": "all-minilm-l6-v2", "input": "a", "dimensions": 12}',
        400,
        "not exported as trained",
    ),
    ("wrong-task", b'{"model": "tiny-clf", "input": "a"}', 400, "text-classification model"),
]


@pytest.mark.parametrize(("body", "status", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_embedding_requests(daemon: Daemon, body: bytes, status: int, needle: str) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        async with s.post("/v1/embeddings", data=body, headers={"Content-Type": "application/json"}) as r:
            payload = await r.json()
            assert r.status == status, payload
        assert set(payload) == {"error"} and {"type", "message"} <= set(payload["error"])
        assert needle in payload["error"]["message"]
        assert "/tmp" not in payload["error"]["message"]  # no host paths leak
        async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": "still serving"}) as r:
            assert r.status == 200


async def test_too_many_inputs_and_oversized_body(daemon: Daemon) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": ["a"] * 2049}) as r:
            assert r.status == 400 and "too many inputs" in (await r.json())["error"]["message"]
        big = {"model": DEFAULT, "input": "word " * ((9 << 20) // 5)}
        async with s.post("/v1/embeddings", json=big) as r:
            payload = await r.json()
            assert r.status == 413 and payload["error"]["message"].startswith("request body too large")
        async with s.get("/no/such/route") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
        async with s.get("/v1/embeddings") as r:
            assert r.status == 405 and "error" in await r.json()
        async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": "ok"}) as r:
            assert r.status == 200


async def test_openapi_describes_every_route(daemon: Daemon) -> None:
    async with aiohttp.ClientSession(daemon.url) as s, s.get("/openapi.json") as r:
        spec = await r.json()
    from llmosd.api import AppState, make_app
    from llmosd.api.state import Live
    from llmosd.config import load_config
    from llmosd.tasks import discover

    cfg = load_config({"state_dir": str(daemon.state_dir)}, {})
    app = make_app(AppState(Live(cfg, "x" * 32), None, None, None, None, tasks=discover()))  # type: ignore[arg-type]
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert routes == documented
