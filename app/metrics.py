"""Prometheus metrics. Request metrics are this process's; job metrics are read from Redis at scrape time,
so one /metrics shows what every worker did (workers are short-lived forks and expose nothing)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from worker.service.job_store import DURATION_BUCKETS, JobStore


class JobCollector:
    def __init__(self, store: JobStore, queue_name: str) -> None:
        self.store, self.queue_name = store, queue_name

    def collect(self):
        by_status = GaugeMetricFamily("graft_jobs", "jobs by status", labels=["status"])
        for status, n in self.store.status_counts().items():
            by_status.add_metric([status], n)
        yield by_status
        depth = GaugeMetricFamily("graft_queue_depth", "jobs waiting in the RQ queue", labels=["queue"])
        depth.add_metric([self.queue_name], self.store.r.llen(f"rq:queue:{self.queue_name}"))
        yield depth
        stats = self.store.stats()
        for name, help_ in (("bytes_read", "input bytes read by finished jobs"),
                            ("bytes_written", "output bytes written by finished jobs"),
                            ("tensors", "tensors written by finished jobs")):
            yield CounterMetricFamily(f"graft_{name}", help_, value=stats.get(name, 0.0))
        buckets, cumulative = [], 0.0
        for bound in DURATION_BUCKETS:
            cumulative = stats.get(f"le_{bound}", 0.0)
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", stats.get("duration_count", 0.0)))
        yield HistogramMetricFamily("graft_job_duration_seconds", "duration of succeeded jobs",
                                    buckets=buckets, sum_value=stats.get("duration_sum", 0.0))


class RequestMetrics:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot GET path)."""

    def __init__(self, app, registry: CollectorRegistry) -> None:
        self.app = app
        self.count = Counter("graft_http_requests", "HTTP requests", ["method", "route", "status"],
                             registry=registry)
        self.latency = Histogram("graft_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.count.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(scope["method"], path).observe(time.perf_counter() - start)
