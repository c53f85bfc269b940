"""Job records in Redis, under our own keys (prefix `vmoba:`), shared by the API and the worker.

Torch-free; RQ only carries the work (`worker.jobs.generate_video(payload)`), while the state users
see lives here with our own retention, independent of RQ's result TTLs.

Keys (all prefixed `vmoba:`):

| key | type | what |
|---|---|---|
| `job:<id>` | hash | the record (`JobRecord`); timings as `t:<name>` fields |
| `jobs` | zset | every job, scored by `created_at` (listing) |
| `queued` | zset | jobs waiting to start, by `created_at` (queue depth, positions, 429) |
| `running` | zset | jobs in progress, by `started_at` (the janitor's `worker_lost` scan) |
| `expiry` | zset | finished jobs, by `expires_at` (the janitor's retention scan) |
| `events:<id>` | pub/sub | live events of a job (JSON, see `publish_event`) |
| `replay:<id>` | list | the last `REPLAY_LEN` events, for SSE resumption (`Last-Event-ID`) |
| `cancel:<id>` | string | cancel flag, checked by the worker at every step |
| `worker:<name>` | string, TTL | heartbeat: JSON info of a live worker (`heartbeat`) |
| `workers` | set | names of workers seen, pruned when their heartbeat key is gone |
| `idem:<sha256>` | string, TTL | Idempotency-Key -> job id |
| `metrics:*` | hashes | counters and histograms of finished jobs (`metrics_snapshot`) |

State changes (`mark_*`) are atomic Lua transitions: each checks the current status, updates the
record and the index sets, bumps the record's `seq`, appends the event to the replay list and
publishes it, and returns False when the job is gone or not in an allowed state (e.g. a cancelled
job must not be started: `mark_started` returning False means "skip this job").

Progress: denoising steps map to 0-90 %, decoding to 92 %, encoding to 96 %, completion to 100 %.

`JobStore` wraps a synchronous `redis.Redis` (worker, CLI, tests); `AsyncJobStore` wraps a
`redis.asyncio.Redis` (the API) with the methods the API needs. Both accept clients with or
without `decode_responses`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, NamedTuple, Optional

from .schemas import JobStatus, Stage

PREFIX = "vmoba:"
JOB_ID_RE = re.compile(r"video_[0-9a-f]{32}")
# Events kept per job for SSE resumption; a job publishes about one per denoising step.
REPLAY_LEN = 64
# Records outlive `expires_at` by this much in Redis itself, a safety net for when no janitor runs
# (the janitor deletes files first, then records).
RECORD_GRACE_S = 3600
# Heartbeat lifetime used when the worker does not choose one.
HEARTBEAT_TTL_S = 30
# Share of `progress` per stage.
DENOISING_PERCENT = 90
STAGE_PERCENT = {Stage.decoding: 92, Stage.encoding: 96, Stage.done: 100}
# Histogram buckets (seconds) for per-stage job latency and per-step denoising time.
STAGE_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TERMINAL = ("completed", "failed", "cancelled")


def new_job_id() -> str:
    """A fresh server-made id, `video_<32 hex>`."""
    return f"video_{uuid.uuid4().hex}"


def is_job_id(value: Any) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def check_job_id(value: Any) -> str:
    """`value` if it is a server-made job id, else `ValueError` (ids become paths: never trust)."""
    if not is_job_id(value):
        raise ValueError(f"job id must look like video_<32 hex digits>, got {value!r}")
    return value


def new_seed() -> int:
    """A random seed in [0, 2**31) for requests that gave none."""
    return secrets.randbelow(2**31)


def request_sha(request: dict) -> str:
    """Fingerprint of a request body, to tell an idempotent retry from a reused key."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


# -- keys ------------------------------------------------------------------------------------


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def replay_key(job_id: str) -> str:
    return f"{PREFIX}replay:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def idempotency_key(key: str, scope: str = "") -> str:
    """Redis key of an Idempotency-Key header value (scoped, e.g. by API key)."""
    digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
    return f"{PREFIX}idem:{digest}"


INDEX_KEY = f"{PREFIX}jobs"
QUEUED_KEY = f"{PREFIX}queued"
RUNNING_KEY = f"{PREFIX}running"
EXPIRY_KEY = f"{PREFIX}expiry"
WORKERS_KEY = f"{PREFIX}workers"
METRICS_JOBS_KEY = f"{PREFIX}metrics:jobs"  # field: final status -> count
METRICS_STAGE_KEY = f"{PREFIX}metrics:stage:"  # + stage name: histogram hash
METRICS_STEP_KEY = f"{PREFIX}metrics:step"  # histogram hash of mean denoising step time


# -- the record --------------------------------------------------------------------------------


@dataclass
class JobRecord:
    """One job as stored in `vmoba:job:<id>`. Times are unix seconds (float)."""

    id: str
    status: str = JobStatus.queued.value
    stage: str = Stage.queued.value
    progress: int = 0
    step: int = 0
    total_steps: int = 0
    request: dict = field(default_factory=dict)  # the validated GenerateRequest, JSON form
    seed: Optional[int] = None
    model: str = ""
    created_at: float = 0.0
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    expires_at: Optional[float] = None
    timings: dict = field(default_factory=dict)  # seconds per stage, e.g. {"denoising_s": 3.2}
    density: Optional[float] = None  # achieved attention density (1.0 = dense)
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    files: list = field(default_factory=list)  # names under DATA_DIR/jobs/<id>/
    worker: Optional[str] = None
    attempts: int = 0
    seq: int = 0  # number of the last event
    request_sha: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict:
        return asdict(self)


_INT_FIELDS = ("progress", "step", "total_steps", "attempts", "seq")
_OPT_INT_FIELDS = ("seed",)
_FLOAT_FIELDS = ("created_at",)
_OPT_FLOAT_FIELDS = ("started_at", "completed_at", "expires_at", "density")
_JSON_FIELDS = ("request", "files")
_OPT_STR_FIELDS = ("error_code", "error_message", "worker")


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value.value if hasattr(value, "value") else value)


def encode_fields(fields: dict) -> dict:
    """Hash fields as strings; `timings={...}` becomes `t:<name>` fields."""
    out = {}
    for name, value in fields.items():
        if name == "timings":
            for tname, tval in (value or {}).items():
                out[f"t:{tname}"] = repr(float(tval))
            continue
        out[name] = _encode_value(value)
    return out


def _fields_json(fields: dict) -> str:
    return json.dumps(encode_fields(fields), separators=(",", ":"))


def decode_record(job_id: str, raw: dict) -> Optional[JobRecord]:
    """A `JobRecord` from HGETALL output (bytes or str), or None if the hash is empty."""
    if not raw:
        return None
    h = {_s(k): _s(v) for k, v in raw.items()}
    rec = JobRecord(id=job_id)
    for name, value in h.items():
        if name.startswith("t:"):
            rec.timings[name[2:]] = float(value)
        elif name in _INT_FIELDS:
            setattr(rec, name, int(value or 0))
        elif name in _OPT_INT_FIELDS:
            setattr(rec, name, int(value) if value else None)
        elif name in _FLOAT_FIELDS:
            setattr(rec, name, float(value or 0))
        elif name in _OPT_FLOAT_FIELDS:
            setattr(rec, name, float(value) if value else None)
        elif name in _JSON_FIELDS:
            setattr(rec, name, json.loads(value) if value else type(getattr(rec, name))())
        elif name in _OPT_STR_FIELDS:
            setattr(rec, name, value or None)
        elif name in ("status", "stage", "model", "request_sha"):
            setattr(rec, name, value)
    return rec


def make_event(rec_fields: dict, job_id: str, type_: str, **extra) -> dict:
    """An event as published: `{type, job_id, ts, status?, stage?, progress?, step?, ...}`.

    `seq` (the SSE id) is added by the Lua transition.
    """
    ev = {"type": type_, "job_id": job_id, "ts": time.time()}
    for name in ("status", "stage", "progress", "step", "total_steps", "error_code",
                 "error_message", "worker"):
        if name in rec_fields and rec_fields[name] is not None:
            value = rec_fields[name]
            ev[name] = value.value if hasattr(value, "value") else value
    ev.update(extra)
    return ev


# -- Lua ---------------------------------------------------------------------------------------

# Create a record unless the Idempotency-Key maps to a live job or the queue is full.
# KEYS: job hash, index zset, queued zset, idempotency key
# ARGV: job id, created score, max queued (0 = no limit), use idempotency ("1"/"0"),
#       idempotency ttl s, request sha, fields (a JSON object of strings: one argument instead of
#       dozens, which costs the client less to encode)
# Returns {"created"|"existing"|"conflict"|"full", job id, queue rank or -1}.
_FLAT_LUA = """
local function flat(json)
  local out = {}
  for k, v in pairs(cjson.decode(json)) do
    out[#out + 1] = k
    out[#out + 1] = v
  end
  return out
end
"""

_CREATE_LUA = _FLAT_LUA + """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local jk = 'vmoba:job:' .. existing
    if redis.call('EXISTS', jk) == 1 then
      if redis.call('HGET', jk, 'request_sha') ~= ARGV[6] then
        return {'conflict', existing, -1}
      end
      return {'existing', existing, redis.call('ZRANK', KEYS[3], existing) or -1}
    end
  end
end
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', KEYS[3]) >= max then
  return {'full', '', -1}
end
redis.call('HSET', KEYS[1], unpack(flat(ARGV[7])))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', tonumber(ARGV[5]))
end
return {'created', ARGV[1], redis.call('ZRANK', KEYS[3], ARGV[1])}
"""

# Move a job between states atomically and publish the event.
# KEYS: job hash, replay list, queued zset, running zset, expiry zset
# ARGV[1] allowed current statuses, comma-separated ('' = any)
# ARGV[2] event JSON object without seq ('' = no event)
# ARGV[3] pub/sub channel
# ARGV[4] replay length, ARGV[5] replay/record TTL s (0 = leave)
# ARGV[6] job id
# ARGV[7] queued op ('add'|'rem'|''), ARGV[8] its score
# ARGV[9] running op, ARGV[10] its score
# ARGV[11] expiry op, ARGV[12] its score
# ARGV[13] hash field to increment by 1 ('' = none)
# ARGV[14] fields to set, a JSON object of strings ('{}' = none)
# Returns the event's seq, 0 if the job does not exist, -1 if its status was not allowed.
_TRANSITION_LUA = _FLAT_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'status')
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == cur then ok = true end
  end
  if not ok then return -1 end
end
local fields = flat(ARGV[14])
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[13] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[13], 1) end
local ops = {{KEYS[3], ARGV[7], ARGV[8]}, {KEYS[4], ARGV[9], ARGV[10]}, {KEYS[5], ARGV[11], ARGV[12]}}
for _, op in ipairs(ops) do
  if op[2] == 'add' then redis.call('ZADD', op[1], op[3], ARGV[6])
  elseif op[2] == 'rem' then redis.call('ZREM', op[1], ARGV[6]) end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if ARGV[2] ~= '' then
  local ev = '{"seq":' .. seq .. ',' .. string.sub(ARGV[2], 2)
  redis.call('RPUSH', KEYS[2], ev)
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
  redis.call('PUBLISH', ARGV[3], ev)
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return seq
"""


class CreateResult(NamedTuple):
    """What `create` did: `outcome` is `"created"`, `"existing"` (same Idempotency-Key and
    request), `"conflict"` (same key, another request) or `"full"` (queue full, nothing stored)."""

    outcome: str
    job_id: str
    position: Optional[int]  # 1 = next to start; None when not waiting


def _create_result(out) -> CreateResult:
    outcome, jid, rank = out
    rank = int(rank)
    return CreateResult(_s(outcome), _s(jid), rank + 1 if rank >= 0 else None)


@dataclass
class _Transition:
    """Arguments of one `_TRANSITION_LUA` call (built by `JobStoreBase._transition_args`)."""

    keys: list
    args: list


class JobStoreBase:
    """Key layout, argument building and decoding shared by `JobStore` and `AsyncJobStore`."""

    def __init__(self, redis, *, retention_s: int = 24 * 3600):
        self.redis = redis
        self.retention_s = int(retention_s)
        self._create_script = redis.register_script(_CREATE_LUA)
        self._transition_script = redis.register_script(_TRANSITION_LUA)

    # -- building -------------------------------------------------------------------------------

    def _new_record_fields(self, job_id: str, request: dict, *, model: str, seed: Optional[int],
                           sha: str, now: float) -> dict:
        return {
            "status": JobStatus.queued, "stage": Stage.queued, "progress": 0, "step": 0,
            "total_steps": int(request.get("num_inference_steps") or 0), "request": request,
            "seed": seed, "model": model, "created_at": now, "attempts": 0, "seq": 0,
            "request_sha": sha, "files": [],
        }

    def _create_args(self, job_id, request, *, model, seed, idempotency_key, idempotency_ttl_s,
                     max_queued, sha, now):
        fields = self._new_record_fields(job_id, request, model=model, seed=seed, sha=sha, now=now)
        keys = [job_key(job_id), INDEX_KEY, QUEUED_KEY, idempotency_key or f"{PREFIX}idem:-"]
        args = [job_id, repr(now), int(max_queued or 0), "1" if idempotency_key else "0",
                int(idempotency_ttl_s), sha, _fields_json(fields)]
        return keys, args

    def _transition_args(self, job_id: str, *, allowed: Iterable[str] = (), event: str = "",
                         fields: Optional[dict] = None, queued: str = "", running: str = "",
                         expiry: str = "", score: float = 0.0, ttl_s: int = 0,
                         incr: str = "", **event_extra) -> _Transition:
        fields = dict(fields or {})
        ev = ""
        if event:
            ev = json.dumps(make_event(fields, job_id, event, **event_extra))
        keys = [job_key(job_id), replay_key(job_id), QUEUED_KEY, RUNNING_KEY, EXPIRY_KEY]
        allowed = ",".join(s.value if hasattr(s, "value") else s for s in allowed)
        args = [allowed, ev, events_channel(job_id), REPLAY_LEN, int(ttl_s), job_id,
                queued, repr(score), running, repr(score), expiry, repr(score), incr,
                _fields_json(fields)]
        return _Transition(keys, args)

    def _end_transition(self, job_id: str, status: JobStatus, allowed, **extra) -> _Transition:
        """`allowed` -> a terminal `status`: kept `retention_s`, out of the queued/running indexes."""
        now = time.time()
        fields = {"status": status, "completed_at": now, "expires_at": now + self.retention_s, **extra}
        return self._transition_args(job_id, allowed=allowed, event=status.value, fields=fields,
                                     queued="rem", running="rem", expiry="add",
                                     score=fields["expires_at"], ttl_s=self.retention_s + RECORD_GRACE_S)

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    def _position(rank) -> Optional[int]:
        return None if rank is None else int(rank) + 1

    @staticmethod
    def _parse_workers(names, values, queue: Optional[str]):
        live, dead = [], []
        for name, value in zip(names, values):
            if value is None:
                dead.append(name)
                continue
            try:
                info = json.loads(_s(value))
            except ValueError:
                continue
            if queue is None or info.get("queue") in (None, queue):
                live.append(info)
        return live, dead

    @staticmethod
    def _parse_histogram(raw: dict, buckets) -> dict:
        h = {_s(k): float(_s(v)) for k, v in (raw or {}).items()}
        return {
            "buckets": [(b, h.get(f"le:{b!r}", 0.0)) for b in buckets],
            "count": h.get("count", 0.0),
            "sum": h.get("sum", 0.0),
        }

    @staticmethod
    def _histogram_ops(pipe, key: str, value: float, buckets) -> None:
        for b in buckets:
            if value <= b:
                pipe.hincrby(key, f"le:{b!r}", 1)  # cumulative, as Prometheus reports
        pipe.hincrby(key, "count", 1)
        pipe.hincrbyfloat(key, "sum", float(value))


class JobStore(JobStoreBase):
    """Job records over a synchronous `redis.Redis` (the worker, the CLI, tests).

    ```python
    store = JobStore(redis.Redis.from_url(url), retention_s=settings.RETENTION_S)
    if store.mark_started(job_id, worker="gpu0"):
        store.mark_progress(job_id, step, total_steps)
        ...
        store.mark_completed(job_id, files=["video.mp4", "thumbnail.jpg", "meta.json"],
                             timings={"denoising_s": 12.3, "decoding_s": 1.1}, density=0.21)
    ```
    """

    # -- create / read --------------------------------------------------------------------------

    def create(self, request: dict, *, model: str, seed: Optional[int] = None,
               job_id: Optional[str] = None, idempotency_key: Optional[str] = None,
               idempotency_ttl_s: int = 24 * 3600, max_queued: int = 0,
               sha: Optional[str] = None, now: Optional[float] = None) -> CreateResult:
        """Store a new queued job, unless `idempotency_key` already names one or `max_queued`
        jobs are waiting. `sha` fingerprints the request for idempotency (default: of `request`)."""
        job_id = check_job_id(job_id) if job_id else new_job_id()
        keys, args = self._create_args(
            job_id, request, model=model, seed=seed, idempotency_key=idempotency_key,
            idempotency_ttl_s=idempotency_ttl_s, max_queued=max_queued,
            sha=sha or request_sha(request), now=time.time() if now is None else now)
        return _create_result(self._create_script(keys=keys, args=args))

    def get(self, job_id: str) -> Optional[JobRecord]:
        """The record, or None if there is no such job."""
        if not is_job_id(job_id):
            return None
        return decode_record(job_id, self.redis.hgetall(job_key(job_id)))

    def get_many(self, job_ids: list[str]) -> list[Optional[JobRecord]]:
        pipe = self.redis.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(job_key(jid))
        return [decode_record(jid, raw) for jid, raw in zip(job_ids, pipe.execute())]

    def list(self, *, limit: int = 20, after: Optional[str] = None,
             order: str = "desc") -> tuple[list[JobRecord], bool]:
        """Jobs newest first (`order="desc"`) or oldest first, starting after job `after`.
        Returns `(records, has_more)`; raises `KeyError` for an unknown `after`."""
        start = 0
        if after is not None:
            rank = (self.redis.zrevrank if order == "desc" else self.redis.zrank)(INDEX_KEY, after)
            if rank is None:
                raise KeyError(after)
            start = int(rank) + 1
        rng = self.redis.zrevrange if order == "desc" else self.redis.zrange
        ids = [_s(x) for x in rng(INDEX_KEY, start, start + limit)]
        has_more = len(ids) > limit
        ids = ids[:limit]
        records = [r for r in self.get_many(ids) if r is not None]
        return records, has_more

    def queue_position(self, job_id: str) -> Optional[int]:
        """1 for the next job to start, None when the job is not waiting."""
        return self._position(self.redis.zrank(QUEUED_KEY, job_id))

    def queue_depth(self) -> int:
        """Jobs waiting to start."""
        return int(self.redis.zcard(QUEUED_KEY))

    def running_jobs(self) -> list[str]:
        """Ids of jobs in progress (for the janitor)."""
        return [_s(x) for x in self.redis.zrange(RUNNING_KEY, 0, -1)]

    def expired(self, now: Optional[float] = None, limit: int = 100) -> list[str]:
        """Ids of finished jobs whose `expires_at` has passed (for the janitor)."""
        now = time.time() if now is None else now
        return [_s(x) for x in self.redis.zrangebyscore(EXPIRY_KEY, "-inf", now, 0, limit)]

    def events_since(self, job_id: str, seq: int = 0) -> list[dict]:
        """Replayable events of a job with `seq` greater than `seq`, oldest first."""
        events = [json.loads(_s(e)) for e in self.redis.lrange(replay_key(job_id), 0, -1)]
        return [e for e in events if e.get("seq", 0) > seq]

    # -- transitions ----------------------------------------------------------------------------

    def _run(self, t: _Transition) -> int:
        return int(self._transition_script(keys=t.keys, args=t.args))

    def update(self, job_id: str, **fields) -> bool:
        """Set record fields as they are (no state check, no event). False if no such job."""
        return self._run(self._transition_args(job_id, fields=fields)) > 0

    def publish_event(self, job_id: str, type_: str, **data) -> int:
        """Publish a custom event (also kept for replay); returns its seq (0: no such job)."""
        return self._run(self._transition_args(job_id, event=type_, **data))

    def mark_started(self, job_id: str, worker: str) -> bool:
        """queued -> in_progress (attempts + 1). False: cancelled, deleted or already taken;
        the worker must then skip the job."""
        now = time.time()
        rec_created = self.redis.hget(job_key(job_id), "created_at")
        fields = {"status": JobStatus.in_progress, "stage": Stage.denoising, "progress": 0,
                  "step": 0, "started_at": now, "worker": worker}
        if rec_created is not None:
            fields["timings"] = {"queued_s": max(0.0, now - float(_s(rec_created)))}
        t = self._transition_args(job_id, allowed=[JobStatus.queued], event="started",
                                  fields=fields, queued="rem", running="add", score=now,
                                  incr="attempts")
        return self._run(t) > 0

    def mark_progress(self, job_id: str, step: int, total_steps: int) -> bool:
        """Denoising step `step` of `total_steps` done (progress 0-90 %)."""
        total = max(1, int(total_steps))
        percent = int(DENOISING_PERCENT * min(int(step), total) / total)
        fields = {"stage": Stage.denoising, "step": int(step), "total_steps": total,
                  "progress": percent}
        t = self._transition_args(job_id, allowed=[JobStatus.in_progress], event="progress",
                                  fields=fields)
        return self._run(t) > 0

    def mark_stage(self, job_id: str, stage: Stage | str) -> bool:
        """Entered `decoding` or `encoding` (progress 92 / 96 %)."""
        stage = Stage(stage)
        fields = {"stage": stage, "progress": STAGE_PERCENT.get(stage, 0)}
        t = self._transition_args(job_id, allowed=[JobStatus.in_progress], event="stage",
                                  fields=fields)
        return self._run(t) > 0

    def mark_completed(self, job_id: str, *, files: list[str], timings: Optional[dict] = None,
                       density: Optional[float] = None) -> bool:
        """in_progress -> completed; results kept for `retention_s`."""
        return self._end(job_id, JobStatus.completed, [JobStatus.in_progress], stage=Stage.done,
                         progress=100, files=list(files), timings=timings or {}, density=density)

    def mark_failed(self, job_id: str, code: str, message: str,
                    timings: Optional[dict] = None) -> bool:
        """queued|in_progress -> failed with an error code (see `schemas.ErrorCode`)."""
        return self._end(job_id, JobStatus.failed, [JobStatus.queued, JobStatus.in_progress],
                         error_code=_code(code), error_message=str(message), timings=timings or {})

    def mark_cancelled(self, job_id: str, message: str = "cancelled by request") -> bool:
        """queued|in_progress -> cancelled (error code `cancelled`)."""
        return self._end(job_id, JobStatus.cancelled, [JobStatus.queued, JobStatus.in_progress],
                         error_code="cancelled", error_message=str(message))

    def mark_requeued(self, job_id: str, reason: str = "") -> bool:
        """in_progress -> queued again (SIGTERM, or a retry after `worker_lost`). The caller
        enqueues the RQ job again."""
        created = self.redis.hget(job_key(job_id), "created_at")
        score = float(_s(created)) if created is not None else time.time()
        fields = {"status": JobStatus.queued, "stage": Stage.queued, "progress": 0, "step": 0,
                  "worker": None, "started_at": None}
        t = self._transition_args(job_id, allowed=[JobStatus.in_progress], event="requeued",
                                  fields=fields, queued="add", running="rem", score=score,
                                  reason=reason)
        return self._run(t) > 0

    def _end(self, job_id: str, status: JobStatus, allowed, **extra) -> bool:
        ok = self._run(self._end_transition(job_id, status, allowed, **extra)) > 0
        if ok:
            self._record_metrics(job_id, status.value)
        return ok

    def _record_metrics(self, job_id: str, status: str) -> None:
        rec = self.get(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(METRICS_JOBS_KEY, status, 1)
        if rec is not None:
            for name, seconds in rec.timings.items():
                if name.endswith("_s"):
                    self._histogram_ops(pipe, METRICS_STAGE_KEY + name[:-2], seconds,
                                        STAGE_BUCKETS_S)
            if status == "completed" and rec.timings.get("denoising_s") and rec.total_steps:
                self._histogram_ops(pipe, METRICS_STEP_KEY,
                                    rec.timings["denoising_s"] / rec.total_steps, STEP_BUCKETS_S)
        pipe.execute()

    # -- cancel ---------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """Raise the cancel flag (the worker checks it at every step)."""
        self.redis.set(cancel_key(job_id), "1", ex=self.retention_s + RECORD_GRACE_S)

    def is_cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    # -- workers --------------------------------------------------------------------------------

    def heartbeat(self, name: str, info: Optional[dict] = None,
                  ttl_s: int = HEARTBEAT_TTL_S) -> None:
        """Say that worker `name` is alive for `ttl_s` more seconds. `info` is free-form JSON,
        by convention `{queue, model, device, pid, host, job_id, speed, ...}`."""
        body = {"name": name, "ts": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                **(info or {})}
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(worker_key(name), json.dumps(body), ex=max(1, int(ttl_s)))
        pipe.sadd(WORKERS_KEY, name)
        pipe.execute()

    def drop_worker(self, name: str) -> None:
        """Forget a worker now (clean shutdown)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(worker_key(name))
        pipe.srem(WORKERS_KEY, name)
        pipe.execute()

    def worker_alive(self, name: str) -> bool:
        return bool(self.redis.exists(worker_key(name)))

    def live_workers(self, queue: Optional[str] = None) -> list[dict]:
        """Heartbeat infos of workers alive now (on `queue`, if given)."""
        names = sorted(_s(n) for n in self.redis.smembers(WORKERS_KEY))
        if not names:
            return []
        values = self.redis.mget([worker_key(n) for n in names])
        live, dead = self._parse_workers(names, values, queue)
        if dead:
            self.redis.srem(WORKERS_KEY, *dead)
        return live

    # -- delete ---------------------------------------------------------------------------------

    def delete(self, job_id: str) -> bool:
        """Remove a job's record, index entries, events and flag (not its files). False if it
        did not exist."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job_id))
        pipe.delete(replay_key(job_id), cancel_key(job_id))
        for key in (INDEX_KEY, QUEUED_KEY, RUNNING_KEY, EXPIRY_KEY):
            pipe.zrem(key, job_id)
        return bool(pipe.execute()[0])

    # -- metrics --------------------------------------------------------------------------------

    def metrics_snapshot(self) -> dict:
        return _metrics_from(self._metrics_pipe().execute())

    def _metrics_pipe(self):
        pipe = self.redis.pipeline(transaction=False)
        _queue_metrics_cmds(pipe)
        return pipe


class AsyncJobStore(JobStoreBase):
    """The API's view of job records, over `redis.asyncio.Redis` (same keys and scripts)."""

    async def create(self, request: dict, *, model: str, seed: Optional[int] = None,
                     job_id: Optional[str] = None, idempotency_key: Optional[str] = None,
                     idempotency_ttl_s: int = 24 * 3600, max_queued: int = 0,
                     sha: Optional[str] = None, now: Optional[float] = None) -> CreateResult:
        """As `JobStore.create`."""
        job_id = check_job_id(job_id) if job_id else new_job_id()
        keys, args = self._create_args(
            job_id, request, model=model, seed=seed, idempotency_key=idempotency_key,
            idempotency_ttl_s=idempotency_ttl_s, max_queued=max_queued,
            sha=sha or request_sha(request), now=time.time() if now is None else now)
        return _create_result(await self._create_script(keys=keys, args=args))

    async def get(self, job_id: str) -> Optional[JobRecord]:
        if not is_job_id(job_id):
            return None
        return decode_record(job_id, await self.redis.hgetall(job_key(job_id)))

    async def get_full(self, job_id: str) -> tuple[Optional[JobRecord], Optional[int], bool]:
        """`(record, queue position, cancel requested)` in one round trip."""
        if not is_job_id(job_id):
            return None, None, False
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(job_key(job_id))
            pipe.zrank(QUEUED_KEY, job_id)
            pipe.exists(cancel_key(job_id))
            raw, rank, cancel = await pipe.execute()
        return decode_record(job_id, raw), self._position(rank), bool(cancel)

    async def list(self, *, limit: int = 20, after: Optional[str] = None,
                   order: str = "desc") -> tuple[list[tuple[JobRecord, Optional[int]]], bool]:
        """As `JobStore.list`, each record paired with its queue position."""
        start = 0
        if after is not None:
            fn = self.redis.zrevrank if order == "desc" else self.redis.zrank
            rank = await fn(INDEX_KEY, after)
            if rank is None:
                raise KeyError(after)
            start = int(rank) + 1
        rng = self.redis.zrevrange if order == "desc" else self.redis.zrange
        ids = [_s(x) for x in await rng(INDEX_KEY, start, start + limit)]
        has_more = len(ids) > limit
        ids = ids[:limit]
        async with self.redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.hgetall(job_key(jid))
                pipe.zrank(QUEUED_KEY, jid)
            out = await pipe.execute()
        items = []
        for i, jid in enumerate(ids):
            rec = decode_record(jid, out[2 * i])
            if rec is not None:
                items.append((rec, self._position(out[2 * i + 1])))
        return items, has_more

    async def queue_depth(self) -> int:
        return int(await self.redis.zcard(QUEUED_KEY))

    async def events_since(self, job_id: str, seq: int = 0) -> list[dict]:
        events = [json.loads(_s(e)) for e in await self.redis.lrange(replay_key(job_id), 0, -1)]
        return [e for e in events if e.get("seq", 0) > seq]

    async def _run(self, t: _Transition) -> int:
        return int(await self._transition_script(keys=t.keys, args=t.args))

    async def mark_failed(self, job_id: str, code: str, message: str) -> bool:
        """queued|in_progress -> failed (the API uses it when enqueuing fails)."""
        return await self._end(job_id, JobStatus.failed, [JobStatus.queued, JobStatus.in_progress],
                               error_code=_code(code), error_message=str(message))

    async def mark_cancelled(self, job_id: str, message: str = "cancelled by request",
                             allowed=(JobStatus.queued,)) -> bool:
        """A waiting job -> cancelled. (A running one is cancelled by its worker, which sees the
        flag set by `request_cancel`.)"""
        return await self._end(job_id, JobStatus.cancelled, allowed, error_code="cancelled",
                               error_message=str(message))

    async def _end(self, job_id: str, status: JobStatus, allowed, **extra) -> bool:
        ok = await self._run(self._end_transition(job_id, status, allowed, **extra)) > 0
        if ok:
            await self.redis.hincrby(METRICS_JOBS_KEY, status.value, 1)
        return ok

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(cancel_key(job_id), "1", ex=self.retention_s + RECORD_GRACE_S)

    async def is_cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(cancel_key(job_id)))

    async def live_workers(self, queue: Optional[str] = None) -> list[dict]:
        names = sorted(_s(n) for n in await self.redis.smembers(WORKERS_KEY))
        if not names:
            return []
        values = await self.redis.mget([worker_key(n) for n in names])
        live, dead = self._parse_workers(names, values, queue)
        if dead:
            await self.redis.srem(WORKERS_KEY, *dead)
        return live

    async def delete(self, job_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(job_key(job_id))
            pipe.delete(replay_key(job_id), cancel_key(job_id))
            for key in (INDEX_KEY, QUEUED_KEY, RUNNING_KEY, EXPIRY_KEY):
                pipe.zrem(key, job_id)
            out = await pipe.execute()
        return bool(out[0])

    async def metrics_snapshot(self) -> dict:
        async with self.redis.pipeline(transaction=False) as pipe:
            _queue_metrics_cmds(pipe)
            out = await pipe.execute()
        return _metrics_from(out)


# -- helpers -----------------------------------------------------------------------------------


def _code(code) -> str:
    return code.value if hasattr(code, "value") else str(code)


_STAGE_METRICS = ("queued", "denoising", "decoding", "encoding", "total")


def _queue_metrics_cmds(pipe) -> None:
    pipe.hgetall(METRICS_JOBS_KEY)
    pipe.zcard(QUEUED_KEY)
    pipe.zcard(RUNNING_KEY)
    pipe.hgetall(METRICS_STEP_KEY)
    for stage in _STAGE_METRICS:
        pipe.hgetall(METRICS_STAGE_KEY + stage)


def _metrics_from(out: list) -> dict:
    jobs, queued, running, step, *stages = out
    return {
        "jobs_total": {_s(k): int(_s(v)) for k, v in (jobs or {}).items()},
        "queue_depth": int(queued),
        "running": int(running),
        "step_seconds": JobStoreBase._parse_histogram(step, STEP_BUCKETS_S),
        "stage_seconds": {
            stage: JobStoreBase._parse_histogram(raw, STAGE_BUCKETS_S)
            for stage, raw in zip(_STAGE_METRICS, stages)
        },
    }
