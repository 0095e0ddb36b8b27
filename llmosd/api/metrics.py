"""GET /metrics in Prometheus' text format (prometheus_client), names in the ``llmosd_`` namespace with
their unit in the name. Request counts and latencies are recorded by a middleware; everything the
schedulers count is read from their statistics at scrape time, so the serving path pays nothing."""

from __future__ import annotations

import asyncio
import functools
import operator
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

import psutil
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from llmosd.api.state import STATE, TASK_KEY, AppState
from llmosd.hardware.gpu import gpu_usage
from llmosd.scheduler import DynamicBatcher, GenerationEngine
from llmosd.scheduler.histogram import SECONDS, Histogram, Snapshot

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NOT_SERVED = "(not served)"  # the model label of a request that named a model this box does not serve
MODEL_KEY = "llmosd.model"  # handlers put the model they served under this request key

routes = web.RouteTableDef()


def _sum(snaps: Iterable[Snapshot]) -> Snapshot:
    return functools.reduce(operator.add, snaps)


def _by_device(snaps: Iterable[tuple[str, Snapshot]]) -> list[tuple[str, Snapshot]]:
    """One histogram per device: instances sharing a device are one series."""
    out: dict[str, Snapshot] = {}
    for device, snap in snaps:
        out[device] = out[device] + snap if device in out else snap
    return list(out.items())


def _histogram(family: HistogramMetricFamily, labels: list[str], snap: Snapshot) -> None:
    buckets = [(repr(float(b)), c) for b, c in zip(snap.bounds, snap.cumulative, strict=False)]
    buckets.append(("+Inf", snap.count))
    family.add_metric(labels, buckets, snap.total)


def _engine_sums() -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
    """One family per GenerationStats field that /metrics sums per model."""
    model = ["model"]
    return {
        "generated_tokens": CounterMetricFamily("llmosd_generated_tokens", "Tokens sampled", labels=model),
        "prefill_tokens": CounterMetricFamily("llmosd_prompt_tokens", "Prompt tokens prefilled", labels=model),
        "running": GaugeMetricFamily("llmosd_running_sequences", "Sequences decoding", labels=model),
        "kv_reserved_bytes": GaugeMetricFamily(
            "llmosd_kv_cache_reserved_bytes", "KV cache reserved by running rows", labels=model
        ),
        "constrained_tokens": CounterMetricFamily(
            "llmosd_constrained_tokens", "Tokens sampled under a grammar (structured outputs, tools)", labels=model
        ),
        "prefix_queries": CounterMetricFamily("llmosd_prefix_cache_queries", "Prompts looked up", labels=model),
        "prefix_hits": CounterMetricFamily("llmosd_prefix_cache_hits", "Prompts that reused cached KV", labels=model),
        "prefix_hit_tokens": CounterMetricFamily(
            "llmosd_prefix_cache_hit_tokens", "Prompt tokens copied from the cache, not prefilled", labels=model
        ),
        "prefix_cache_bytes": GaugeMetricFamily("llmosd_prefix_cache_bytes", "KV held by the cache", labels=model),
    }


def _model_gauges() -> tuple[GaugeMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
    model = ["model"]
    ready = GaugeMetricFamily("llmosd_model_ready", "1 while every worker of the model runs", labels=model)
    restarts = CounterMetricFamily(
        "llmosd_worker_restarts", "Worker threads restarted after dying (this version)", labels=model
    )
    kv_usage = GaugeMetricFamily(  # what inference gateways route on (vLLM's kv_cache_usage_perc)
        "llmosd_kv_cache_usage_ratio",
        "KV cache the running rows reserve (prompt plus max_tokens each), as a fraction of the budget",
        labels=model,
    )
    return ready, restarts, kv_usage


class SchedulerCollector(Collector):
    """Reads the model pool and the devices at scrape time."""

    def __init__(self, app_state: AppState, usage: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        self.state = app_state
        self.usage = usage

    def collect(self) -> Iterator[Metric]:
        served = self.state.pool.served()
        labels = ["model", "device"]
        loaded = GaugeMetricFamily("llmosd_models_loaded", "Models loaded and serving")
        loaded.add_metric([], len(served))
        info = GaugeMetricFamily(
            "llmosd_model_info",
            "A served model: its instances on each device",
            labels=["model", "version", "task", "precision", "device"],
        )
        depth = GaugeMetricFamily("llmosd_queue_depth", "Inputs (generation: sequences) waiting", labels=["model"])
        rejected = CounterMetricFamily("llmosd_rejected_requests", "Requests refused with 429", labels=["model"])
        wait = HistogramMetricFamily("llmosd_queue_wait_seconds", "Time from admission to first run", labels=["model"])
        infer = HistogramMetricFamily(
            "llmosd_inference_seconds", "Session run time (batch, prefill or decode step)", labels=[*labels, "phase"]
        )
        sizes = HistogramMetricFamily("llmosd_batch_size", "Inputs per batch run", labels=["model"])
        items = CounterMetricFamily("llmosd_inference_items", "Inputs run by the batcher", labels=["model"])
        sums = _engine_sums()  # generation statistics summed over a model's engines
        ready, restarts, kv_usage = _model_gauges()
        for s in served:
            m = s.manifest
            ready.add_metric([m.name], 1 if s.healthy() else 0)
            restarts.add_metric([m.name], s.restarts())
            for device in dict.fromkeys(s.devices):
                info.add_metric([m.name, str(m.version), m.task, m.precision, device], s.devices.count(device))
            batchers = [(i.device, i.worker.stats) for i in s.instances if isinstance(i.worker, DynamicBatcher)]
            engines = [(i.device, i.worker.stats) for i in s.instances if isinstance(i.worker, GenerationEngine)]
            if batchers:
                depth.add_metric([m.name], sum(i.queued() for i in s.instances))
                rejected.add_metric([m.name], sum(b.rejected for _, b in batchers))
                _histogram(wait, [m.name], _sum(b.queue_wait.snapshot() for _, b in batchers))
                for device, snap in _by_device((d, b.run_time.snapshot()) for d, b in batchers):
                    _histogram(infer, [m.name, device, "batch"], snap)
                _histogram(sizes, [m.name], _sum(b.sizes.snapshot() for _, b in batchers))
                items.add_metric([m.name], sum(b.items for _, b in batchers))
            if engines:
                depth.add_metric([m.name], sum(g.waiting for _, g in engines))
                rejected.add_metric([m.name], sum(g.rejected for _, g in engines))
                _histogram(wait, [m.name], _sum(g.queue_wait.snapshot() for _, g in engines))
                for device, snap in _by_device((d, g.prefill_time.snapshot()) for d, g in engines):
                    _histogram(infer, [m.name, device, "prefill"], snap)
                for device, snap in _by_device((d, g.step_time.snapshot()) for d, g in engines):
                    _histogram(infer, [m.name, device, "decode"], snap)
                for field, family in sums.items():
                    family.add_metric([m.name], sum(getattr(g, field) for _, g in engines))
                budget = sum(
                    i.worker.limits.kv_cache_bytes for i in s.instances if isinstance(i.worker, GenerationEngine)
                )
                kv_usage.add_metric([m.name], sum(g.kv_reserved_bytes for _, g in engines) / max(budget, 1))
        yield from (loaded, info, depth, rejected, wait, infer, sizes, items, *sums.values(), kv_usage, ready, restarts)
        yield from self._loop()
        yield from self._devices()

    def _loop(self) -> Iterator[Metric]:
        lag = self.state.lag
        blocks = CounterMetricFamily(
            "llmosd_event_loop_blocks", "Wake-ups of the event loop later than loop_block_ms (something blocked it)"
        )
        blocks.add_metric([], lag.blocks)
        starved = CounterMetricFamily(
            "llmosd_event_loop_starved", "Late wake-ups while other processes kept the cores busy (not blocks)"
        )
        starved.add_metric([], lag.starved)
        worst = GaugeMetricFamily("llmosd_event_loop_lag_max_seconds", "The latest the event loop woke, since start")
        worst.add_metric([], lag.worst_s)
        yield from (blocks, starved, worst)

    def _devices(self) -> Iterator[Metric]:
        memory = GaugeMetricFamily("llmosd_device_memory_bytes", "Device memory", labels=["device", "state"])
        vm = psutil.virtual_memory()
        memory.add_metric(["cpu", "total"], vm.total)
        memory.add_metric(["cpu", "available"], vm.available)
        util = GaugeMetricFamily("llmosd_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["device"])
        gpus = self.state.hardware.gpus
        for device, total, used, percent in self.usage() if gpus else []:
            memory.add_metric([device, "total"], total)
            memory.add_metric([device, "used"], used)
            memory.add_metric([device, "free"], total - used)
            util.add_metric([device], percent / 100)
        yield memory
        yield util


class ModelLatency(Collector):
    """Request time by the served model a request named (the console's per-model p50 and p99)."""

    def __init__(self) -> None:
        self.by_model: dict[str, Histogram] = {}  # served names only: a bounded set

    def observe(self, model: str, seconds: float) -> None:
        self.by_model.setdefault(model, Histogram()).observe(seconds)

    def snapshot(self, model: str) -> Snapshot:
        return self.by_model.get(model, EMPTY).snapshot()

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "llmosd_model_request_duration_seconds", "HTTP request time by the model it named", labels=["model"]
        )
        for model, histogram in list(self.by_model.items()):
            _histogram(family, [model], histogram.snapshot())
        yield family


class RoutingCollector(Collector):
    """Where requests went (``route``: local, lan:NAME, upstream:NAME) and which upstreams answer."""

    def __init__(self, app_state: AppState) -> None:
        self.state = app_state

    def collect(self) -> Iterator[Metric]:
        router = self.state.router
        routed = CounterMetricFamily(
            "llmosd_routed_requests", "Requests by the route that answered them", labels=["model", "route"]
        )
        for (model, route), n in sorted(router.routed.items()):
            routed.add_metric([model, route], n)
        generated = CounterMetricFamily(
            "llmosd_routed_generated_tokens",
            "Tokens generated elsewhere for this box's clients, as the answers report them",
            labels=["model", "route"],
        )
        for (model, route), n in sorted(router.generated.items()):
            generated.add_metric([model, route], n)
        up = GaugeMetricFamily("llmosd_upstream_up", "1 while an upstream answers its checks", labels=["route"])
        in_flight = GaugeMetricFamily(
            "llmosd_upstream_in_flight", "Requests forwarded, not yet answered", labels=["route"]
        )
        for u in router.upstreams():
            up.add_metric([u.route], 1 if u.health.up else 0)
            in_flight.add_metric([u.route], u.in_flight)
        yield from (routed, generated, up, in_flight)


EMPTY = Histogram()  # never observed: what a model no request named yet reads as


class Metrics:
    def __init__(self, app_state: AppState, usage: Callable[[], list[tuple[str, int, int, int]]] = gpu_usage) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "llmosd_requests",
            "HTTP requests by route, model and status",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.task_requests = Counter(
            "llmosd_task_requests",
            "HTTP requests a model of each task answered (every route: the task's own, /v2, /v1/models), by status",
            ["task", "status"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "llmosd_rate_limited_requests",
            "Requests refused with 429 by the per-token and per-address rate limits",
            registry=self.registry,
        )
        self.latency = PromHistogram(
            "llmosd_request_duration_seconds",
            "HTTP request time, streams included",
            ["route"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.model_latency = ModelLatency()
        self.registry.register(self.model_latency)
        ProcessCollector(namespace="llmosd", registry=self.registry)  # RSS, open fds, CPU seconds
        self.registry.register(SchedulerCollector(app_state, usage))
        self.registry.register(RoutingCollector(app_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


@web.middleware
async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics = request.app[METRICS]
        model = model_label(request)
        elapsed = time.perf_counter() - started
        metrics.requests.labels(route, model, str(status)).inc()
        if isinstance(task := request.get(TASK_KEY), str):  # a served model's manifest: a bounded set
            metrics.task_requests.labels(task, str(status)).inc()
        metrics.latency.labels(route).observe(elapsed)
        if model and model != NOT_SERVED:
            metrics.model_latency.observe(model, elapsed)


def model_label(request: web.Request) -> str:
    """The model a request named, as a label only when this box serves it: a client's free text would
    make one series per name it invents (and one unencodable name broke the whole exposition)."""
    name = request.get(MODEL_KEY)
    if not isinstance(name, str) or not name:
        return ""
    return name if request.app[STATE].pool.serves(name) else NOT_SERVED


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[METRICS].render)  # NVML queries block
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
