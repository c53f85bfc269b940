"""Prometheus metrics: HTTP traffic of this process, plus job metrics read from Redis.

- `vmoba_http_requests_total{method, route, status}`, `vmoba_http_request_duration_seconds`:
  counted by `MetricsMiddleware` (route = the path template, e.g. `/jobs/{job_id}`).
- `vmoba_jobs_submitted_total`, `vmoba_jobs_rejected_total{reason}`: this API's decisions.
- From Redis at scrape time (so they agree across API processes and include the workers' work):
  `vmoba_jobs_finished_total{status}`, `vmoba_queue_depth`, `vmoba_jobs_running`,
  `vmoba_live_workers`, `vmoba_job_stage_seconds{stage}` (queued, denoising, decoding, encoding,
  upload (publishing to results storage, retries included), total) and `vmoba_denoising_step_seconds` histograms.

With several uvicorn workers, set `PROMETHEUS_MULTIPROC_DIR` (`make serve` does) so the per-process
counters are summed.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

REQUESTS = Counter(
    "vmoba_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "vmoba_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
SUBMITTED = Counter("vmoba_jobs_submitted_total", "Jobs accepted by this API")
REJECTED = Counter("vmoba_jobs_rejected_total", "Job submissions refused", ["reason"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware) counting requests by route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(scope["method"], path, str(status[0])).inc()
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)


class _Snapshot:
    """A collector over one `metrics_snapshot()` of the job store."""

    def __init__(self, snap: dict, live_workers: int):
        self.snap = snap
        self.live_workers = live_workers

    def collect(self):
        s = self.snap
        jobs = CounterMetricFamily(
            "vmoba_jobs_finished", "Jobs that ended, by final status", labels=["status"]
        )
        for status in ("completed", "failed", "cancelled"):
            jobs.add_metric([status], s["jobs_total"].get(status, 0))
        yield jobs
        yield GaugeMetricFamily("vmoba_queue_depth", "Jobs waiting to start", s["queue_depth"])
        yield GaugeMetricFamily("vmoba_jobs_running", "Jobs in progress", s["running"])
        yield GaugeMetricFamily(
            "vmoba_live_workers", "Workers with a live heartbeat", self.live_workers
        )
        stage = HistogramMetricFamily(
            "vmoba_job_stage_seconds", "Time finished jobs spent per stage", labels=["stage"]
        )
        for name, h in s["stage_seconds"].items():
            stage.add_metric([name], _buckets(h), h["sum"])
        yield stage
        step = HistogramMetricFamily(
            "vmoba_denoising_step_seconds", "Mean denoising step time of completed jobs"
        )
        step.add_metric([], _buckets(s["step_seconds"]), s["step_seconds"]["sum"])
        yield step


def _buckets(h: dict) -> list:
    return [(repr(float(b)), c) for b, c in h["buckets"]] + [("+Inf", h["count"])]


def render(snapshot: dict, live_workers: int) -> bytes:
    """The /metrics body: this process's (or all processes') counters, then the job metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    jobs = CollectorRegistry()
    jobs.register(_Snapshot(snapshot, live_workers))
    return generate_latest(registry) + generate_latest(jobs)
