"""Prometheus metrics, one registry per app (no process globals), and the ASGI middleware that feeds them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.types import Engine
from server.observability.pools import PoolCollector, PoolReading, PoolTelemetry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's counters and histograms; pool and device gauges are read per scrape (`pools`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pools = PoolTelemetry()
        self.requests = Counter(
            "server_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "server_request_duration_seconds",
            "HTTP request latency (to last byte)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "server_errors", "Error responses by OpenAI error type and code", ["type", "code"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "server_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "server_completion_tokens", "Completion tokens generated", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "server_time_to_first_token_seconds",
            "Time to first token (streaming)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch_engines(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self.registry.register(_EngineCollector(engines))

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def render(self, pools: Sequence[PoolReading] = ()) -> bytes:
        """The exposition text: the registry, plus the pool readings taken for this scrape."""
        return generate_latest(_Scrape(self.registry, PoolCollector(pools)))


class _Scrape(Collector):
    """Several collectors exposed as one, without registering per-scrape ones in the app's registry."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class _EngineCollector(Collector):
    """Reads queue depth and running requests from each engine at scrape time."""

    def __init__(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self._engines = engines

    def collect(self):  # type: ignore[no-untyped-def]
        waiting = GaugeMetricFamily(
            "server_engine_queue_depth", "Requests waiting for their first token", labels=["model", "pool"]
        )
        running = GaugeMetricFamily("server_engine_running", "Requests generating", labels=["model", "pool"])
        aborted = CounterMetricFamily(
            "server_engine_aborted",
            "Engine requests aborted before finishing (client disconnects, errors, shutdown)",
            labels=["model", "pool"],
        )
        ready = GaugeMetricFamily(
            "server_engine_ready", "1 when the engine accepts requests", labels=["model", "pool", "version", "digest"]
        )
        for engine in self._engines():
            stats, info = engine.stats(), engine.info
            waiting.add_metric([info.name, info.pool], stats.waiting)
            running.add_metric([info.name, info.pool], stats.running)
            aborted.add_metric([info.name, info.pool], stats.aborted)
            ready.add_metric([info.name, info.pool, info.version, info.short_digest], float(engine.ready()))
        yield waiting
        yield running
        yield aborted
        yield ready


class MetricsMiddleware:
    """Counts every HTTP request by its route template (never the raw path: bounded label cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "unmatched"
