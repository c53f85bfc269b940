"""Job ids and the Redis key layout (every key starts with `vmoba:`).

| key | type | what |
|---|---|---|
| `job:<id>` | hash | the record (`record.JobRecord`); timings as `t:<name>` fields |
| `jobs` | zset | every job, scored by `created_at` (listing) |
| `jobs:owner:<owner>` | zset | the jobs of one API key (`owner_id`), by `created_at` (its listing) |
| `queued` | zset | jobs waiting to start, by `created_at` (queue depth, positions, 429) |
| `running` | zset | jobs in progress, by `started_at` (the janitor's `worker_lost` scan) |
| `expiry` | zset | finished jobs, by `expires_at` (the janitor's retention scan) |
| `events:<id>` | pub/sub | live events of a job (JSON) |
| `replay:<id>` | list | the last `REPLAY_LEN` events, for SSE resumption (`Last-Event-ID`) |
| `cancel:<id>` | string | cancel flag, checked by the worker at every step |
| `input:<id>` | string, TTL | the input image of an image-to-video job (PNG, fitted to its size) |
| `worker:<name>` | string, TTL | heartbeat: JSON info of a live worker |
| `workers` | set | names of workers seen, pruned when their heartbeat key is gone |
| `idem:<sha256>` | string, TTL | Idempotency-Key -> job id |
| `metrics:*` | hashes | counters and histograms of finished jobs |
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from typing import Any, TypeGuard

PREFIX = "vmoba:"
JOB_ID_RE = re.compile(r"video_[0-9a-f]{32}")

INDEX_KEY = f"{PREFIX}jobs"
QUEUED_KEY = f"{PREFIX}queued"
RUNNING_KEY = f"{PREFIX}running"
EXPIRY_KEY = f"{PREFIX}expiry"
WORKERS_KEY = f"{PREFIX}workers"
JANITOR_LOCK_KEY = f"{PREFIX}janitor:lock"
METRICS_JOBS_KEY = f"{PREFIX}metrics:jobs"  # field: final status -> count
METRICS_STAGE_KEY = f"{PREFIX}metrics:stage:"  # + stage name: histogram hash
METRICS_STEP_KEY = f"{PREFIX}metrics:step"  # histogram hash of mean denoising step time


def owner_index_key(owner: str) -> str:
    """The listing index of one owner's jobs (`owner` as `owner_id` made it)."""
    return f"{INDEX_KEY}:owner:{owner}"


def owner_id(api_key: str) -> str:
    """Who owns the jobs an API key creates: a hash of the key (records never hold the key)."""
    return hashlib.sha256(f"vmoba-owner\0{api_key}".encode()).hexdigest()[:32]


def new_job_id() -> str:
    """A fresh server-made id, `video_<32 hex>`."""
    return f"video_{uuid.uuid4().hex}"


def is_job_id(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def check_job_id(value: Any) -> str:
    """`value` if it is a server-made job id, else `ValueError` (ids become paths: never trust)."""
    if not is_job_id(value):
        raise ValueError(f"job id must look like video_<32 hex digits>, got {value!r}")
    return str(value)


def new_seed() -> int:
    """A random seed in [0, 2**31) for requests that gave none."""
    return secrets.randbelow(2**31)


def request_sha(request: dict) -> str:
    """Fingerprint of a request body, to tell an idempotent retry from a reused key."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def replay_key(job_id: str) -> str:
    return f"{PREFIX}replay:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def input_key(job_id: str) -> str:
    return f"{PREFIX}input:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def idempotency_key(key: str, scope: str = "") -> str:
    """Redis key of an Idempotency-Key header value (scoped, e.g. by API key)."""
    digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
    return f"{PREFIX}idem:{digest}"
