"""/metrics on the real daemon: Prometheus' own parser reads it and it counts what the test sent."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT, SMOLLM2, Daemon


async def scrape(s: aiohttp.ClientSession, daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with s.get(daemon.url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_tokens_and_describe_the_process(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        before = await scrape(s, daemon)
        for _ in range(3):
            async with s.post(daemon.url + "/v1/embeddings", json={"model": DEFAULT, "input": ["a", "b"]}) as r:
                assert r.status == 200
        async with s.post(daemon.url + "/v1/embeddings", json={"model": DEFAULT, "input": []}) as r:
            assert r.status == 400
        body = {"model": SMOLLM2, "prompt": "Hello", "max_tokens": 7, "ignore_eos": True, "temperature": 0}
        async with s.post(daemon.url + "/v1/completions", json=body) as r:
            completion = await r.json()
        after = await scrape(s, daemon)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/embeddings"
    assert delta("llmosd_requests_total", route=route, model=DEFAULT, status="200") == 3
    assert delta("llmosd_requests_total", route=route, model="", status="400") == 1  # refused before a model
    assert delta("llmosd_requests_total", route="/v1/completions", model=SMOLLM2, status="200") == 1
    assert delta("llmosd_request_duration_seconds_count", route=route) == 4
    assert delta("llmosd_inference_items_total", model=DEFAULT) == 6
    assert delta("llmosd_generated_tokens_total", model=SMOLLM2) == completion["usage"]["completion_tokens"] == 7
    assert delta("llmosd_prompt_tokens_total", model=SMOLLM2) == completion["usage"]["prompt_tokens"]
    assert delta("llmosd_inference_seconds_count", model=SMOLLM2, device="cpu", phase="decode") == 6
    assert delta("llmosd_batch_size_count", model=DEFAULT) >= 1
    assert delta("llmosd_model_request_duration_seconds_count", model=DEFAULT) == 3  # by the model it named
    assert delta("llmosd_model_request_duration_seconds_count", model=SMOLLM2) == 1
    assert value(after, "llmosd_models_loaded") == 4
    assert (
        value(
            after,
            "llmosd_model_info",
            model=SMOLLM2,
            version="1",
            task="text-generation",
            precision="int4",
            device="cpu",
        )
        == 1
    )
    assert value(after, "llmosd_queue_depth", model=SMOLLM2) == 0
    assert value(after, "llmosd_process_resident_memory_bytes") > 100e6
    assert value(after, "llmosd_process_open_fds") > 3
    assert value(after, "llmosd_device_memory_bytes", device="cpu", state="total") > 1e9


async def test_the_gauges_an_inference_gateway_routes_on_follow_a_running_generation(daemon: Daemon) -> None:
    """Waiting and running requests and KV-cache use per model (README "Behind an inference gateway"):
    read in the middle of a stream, then after it."""
    body = {"model": SMOLLM2, "prompt": "Once", "max_tokens": 120, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(daemon.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            for _ in range(4):  # a few tokens out: the row runs, and the engine published its counts after a step
                await r.content.readuntil(b"\n\n")
            during = await scrape(s, daemon)
            async for _ in r.content:
                pass
        # the engine publishes its counts after each step: the row it freed shows within a step or so
        deadline = asyncio.get_running_loop().time() + 5
        while value(after := await scrape(s, daemon), "llmosd_running_sequences", model=SMOLLM2) and (
            asyncio.get_running_loop().time() < deadline
        ):
            await asyncio.sleep(0.05)
    assert value(during, "llmosd_running_sequences", model=SMOLLM2) == 1
    assert value(during, "llmosd_queue_depth", model=SMOLLM2) == 0
    assert 0 < value(during, "llmosd_kv_cache_usage_ratio", model=SMOLLM2) <= 1
    assert value(after, "llmosd_running_sequences", model=SMOLLM2) == 0
    assert value(after, "llmosd_kv_cache_usage_ratio", model=SMOLLM2) == 0
    assert ("llmosd_kv_cache_usage_ratio", (("model", DEFAULT),)) not in after  # encoders have no KV cache
