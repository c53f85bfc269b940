"""Counters and histograms of finished jobs, kept in Redis so every API process reports the same.

The worker (or the API, for jobs it ends itself) records a job once it ends; `/metrics` reads
`snapshot()`.
"""

from __future__ import annotations

from typing import Any

from .keys import METRICS_JOBS_KEY, METRICS_STAGE_KEY, METRICS_STEP_KEY, QUEUED_KEY, RUNNING_KEY
from .ops import Ops, pipelined
from .record import JobRecord, as_text

# Histogram buckets (seconds) for per-stage job latency and per-step denoising time.
STAGE_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGE_METRICS = ("queued", "denoising", "decoding", "encoding", "upload", "total")


def _observe(pipe: Any, key: str, value: float, buckets: tuple) -> None:
    for b in buckets:
        if value <= b:
            pipe.hincrby(key, f"le:{b!r}", 1)  # cumulative, as Prometheus reports
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", float(value))


def record_end(rec: JobRecord | None, status: str) -> Ops[None]:
    """Count a job that ended as `status`, with its stage timings and mean step time."""

    def build(pipe: Any) -> None:
        pipe.hincrby(METRICS_JOBS_KEY, status, 1)
        if rec is None:
            return
        for name, seconds in rec.timings.items():
            if name.endswith("_s"):
                _observe(pipe, METRICS_STAGE_KEY + name[:-2], seconds, STAGE_BUCKETS_S)
        if status == "completed" and rec.timings.get("denoising_s") and rec.total_steps:
            _observe(
                pipe, METRICS_STEP_KEY, rec.timings["denoising_s"] / rec.total_steps, STEP_BUCKETS_S
            )

    yield pipelined(build)


def _histogram(raw: dict | None, buckets: tuple) -> dict:
    h = {as_text(k): float(as_text(v)) for k, v in (raw or {}).items()}
    return {
        "buckets": [(b, h.get(f"le:{b!r}", 0.0)) for b in buckets],
        "count": h.get("count", 0.0),
        "sum": h.get("sum", 0.0),
    }


def snapshot() -> Ops[dict]:
    """`{jobs_total, queue_depth, running, step_seconds, stage_seconds}` in one round trip."""

    def build(pipe: Any) -> None:
        pipe.hgetall(METRICS_JOBS_KEY)
        pipe.zcard(QUEUED_KEY)
        pipe.zcard(RUNNING_KEY)
        pipe.hgetall(METRICS_STEP_KEY)
        for stage in STAGE_METRICS:
            pipe.hgetall(METRICS_STAGE_KEY + stage)

    jobs, queued, running, step, *stages = yield pipelined(build)
    return {
        "jobs_total": {as_text(k): int(as_text(v)) for k, v in (jobs or {}).items()},
        "queue_depth": int(queued),
        "running": int(running),
        "step_seconds": _histogram(step, STEP_BUCKETS_S),
        "stage_seconds": {
            stage: _histogram(raw, STAGE_BUCKETS_S) for stage, raw in zip(STAGE_METRICS, stages)
        },
    }
