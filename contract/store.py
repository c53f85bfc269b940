"""The job store: records users see, over a synchronous (`JobStore`) or asyncio
(`AsyncJobStore`) Redis client. RQ only carries the work; the state lives here, with our own
retention.

Every operation is written once (`_JobOps`, generators of Redis calls, see `contract.ops`); the
two stores are the same operations run by a blocking or an awaiting driver.

```python
store = JobStore(redis.Redis.from_url(url), retention_s=settings.RETENTION_S)
if store.mark_started(job_id, worker="gpu0"):
    store.mark_progress(job_id, step, total_steps)
    store.mark_completed(job_id, files=["video.mp4", "thumbnail.jpg", "meta.json"],
                         timings={"denoising_s": 12.3, "decoding_s": 1.1}, density=0.21)
```

Progress: denoising steps map to 0-90 %, decoding to 92 %, encoding to 96 %, completion to 100 %.
Both stores accept clients with or without `decode_responses`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, Optional

from . import heartbeats, metrics
from .keys import (
    EXPIRY_KEY,
    INDEX_KEY,
    QUEUED_KEY,
    RUNNING_KEY,
    cancel_key,
    check_job_id,
    input_key,
    is_job_id,
    job_key,
    new_job_id,
    owner_index_key,
    replay_key,
    request_sha,
)
from .ops import Ops, async_method, pipelined, sync_method
from .record import JobRecord, as_text, decode_record
from .scripts import (
    CREATE_LUA,
    RECORD_GRACE_S,
    RESTORE_LUA,
    TRANSITION_LUA,
    CreateResult,
    ScriptCall,
    create_call,
    create_result,
    end_call,
    restore_call,
    transition_call,
)
from .status import DENOISING_PERCENT, STAGE_PERCENT, ErrorCode, JobStatus, Stage, enum_value

RUNNABLE = (JobStatus.queued, JobStatus.in_progress)


def _position(rank: Any) -> Optional[int]:
    return None if rank is None else int(rank) + 1


class _JobOps:
    """Every job-store operation, once. Subclasses bind them to a client kind."""

    def __init__(self, redis: Any, *, retention_s: int = 24 * 3600):
        self.redis = redis
        self.retention_s = int(retention_s)
        self._create_script = redis.register_script(CREATE_LUA)
        self._transition_script = redis.register_script(TRANSITION_LUA)
        self._restore_script = redis.register_script(RESTORE_LUA)

    def _script(self, script: Any, call: ScriptCall) -> Any:
        return lambda _client: script(keys=call.keys, args=call.args)

    def _transition(self, call: ScriptCall) -> Ops[int]:
        return int((yield self._script(self._transition_script, call)))

    # -- create / read --------------------------------------------------------------------------

    def _create(
        self,
        request: dict,
        *,
        model: str,
        seed: Optional[int] = None,
        job_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        idempotency_ttl_s: int = 24 * 3600,
        max_queued: int = 0,
        sha: Optional[str] = None,
        now: Optional[float] = None,
        owner: str = "",
    ) -> Ops[CreateResult]:
        """Store a new queued job, unless `idempotency_key` already names one or `max_queued`
        jobs are waiting. `sha` fingerprints the request for idempotency (default: of `request`);
        `owner` (`keys.owner_id` of the creating API key) is who may see the job."""
        call = create_call(
            check_job_id(job_id) if job_id else new_job_id(),
            request,
            model=model,
            seed=seed,
            idempotency_key=idempotency_key,
            idempotency_ttl_s=idempotency_ttl_s,
            max_queued=max_queued,
            sha=sha or request_sha(request),
            now=time.time() if now is None else now,
            owner=owner,
        )
        return create_result((yield self._script(self._create_script, call)))

    def _get(self, job_id: str) -> Ops[Optional[JobRecord]]:
        """The record, or None if there is no such job."""
        if not is_job_id(job_id):
            return None
        return decode_record(job_id, (yield lambda r: r.hgetall(job_key(job_id))))

    def _get_full(self, job_id: str) -> Ops[tuple[Optional[JobRecord], Optional[int], bool]]:
        """`(record, queue position, cancel requested)` in one round trip."""
        if not is_job_id(job_id):
            return None, None, False

        def build(pipe: Any) -> None:
            pipe.hgetall(job_key(job_id))
            pipe.zrank(QUEUED_KEY, job_id)
            pipe.exists(cancel_key(job_id))

        raw, rank, cancel = yield pipelined(build)
        return decode_record(job_id, raw), _position(rank), bool(cancel)

    def _list(
        self,
        *,
        limit: int = 20,
        after: Optional[str] = None,
        order: str = "desc",
        owner: Optional[str] = None,
    ) -> Ops[tuple[list[tuple[JobRecord, Optional[int]]], bool]]:
        """Jobs newest first (`order="desc"`) or oldest first, starting after job `after`, each
        with its queue position: every job, or with `owner` only that owner's. Returns
        `(items, has_more)`; `KeyError` for an unknown `after`."""
        desc = order == "desc"
        index = INDEX_KEY if owner is None else owner_index_key(owner or "-")
        start = 0
        if after is not None:
            rank = yield lambda r: (r.zrevrank if desc else r.zrank)(index, after)
            if rank is None:
                raise KeyError(after)
            start = int(rank) + 1
        raw_ids = yield lambda r: (r.zrevrange if desc else r.zrange)(index, start, start + limit)
        ids = [as_text(x) for x in raw_ids]
        has_more = len(ids) > limit
        ids = ids[:limit]

        def build(pipe: Any) -> None:
            for jid in ids:
                pipe.hgetall(job_key(jid))
                pipe.zrank(QUEUED_KEY, jid)

        out = (yield pipelined(build)) if ids else []
        items = []
        for i, jid in enumerate(ids):
            rec = decode_record(jid, out[2 * i])
            if rec is not None and (owner is None or rec.owner == owner):
                items.append((rec, _position(out[2 * i + 1])))
        return items, has_more

    def _queue_position(self, job_id: str) -> Ops[Optional[int]]:
        """1 for the next job to start, None when the job is not waiting."""
        return _position((yield lambda r: r.zrank(QUEUED_KEY, job_id)))

    def _queue_depth(self) -> Ops[int]:
        """Jobs waiting to start."""
        return int((yield lambda r: r.zcard(QUEUED_KEY)))

    def _running_jobs(self) -> Ops[list[str]]:
        """Ids of jobs in progress (for the janitor)."""
        return [as_text(x) for x in (yield lambda r: r.zrange(RUNNING_KEY, 0, -1))]

    def _expired(self, now: Optional[float] = None, limit: int = 100) -> Ops[list[str]]:
        """Ids of finished jobs whose `expires_at` has passed (for the janitor)."""
        cutoff = time.time() if now is None else now
        found = yield lambda r: r.zrangebyscore(EXPIRY_KEY, "-inf", cutoff, 0, limit)
        return [as_text(x) for x in found]

    def _events_since(self, job_id: str, seq: int = 0) -> Ops[list[dict]]:
        """Replayable events of a job with `seq` greater than `seq`, oldest first."""
        raw = yield lambda r: r.lrange(replay_key(job_id), 0, -1)
        events = [json.loads(as_text(e)) for e in raw]
        return [e for e in events if e.get("seq", 0) > seq]

    # -- transitions ----------------------------------------------------------------------------

    def _update(self, job_id: str, **fields: Any) -> Ops[bool]:
        """Set record fields as they are (no state check, no event). False if no such job."""
        return (yield from self._transition(transition_call(job_id, fields=fields))) > 0

    def _publish_event(self, job_id: str, type_: str, **data: Any) -> Ops[int]:
        """Publish a custom event (also kept for replay); returns its seq (0: no such job)."""
        return (yield from self._transition(transition_call(job_id, event=type_, **data)))

    def _mark_started(self, job_id: str, worker: str) -> Ops[bool]:
        """queued -> in_progress (attempts + 1). False: cancelled, deleted or already taken;
        the worker must then skip the job."""
        now = time.time()
        created = yield lambda r: r.hget(job_key(job_id), "created_at")
        fields: dict[str, Any] = {
            "status": JobStatus.in_progress,
            "stage": Stage.denoising,
            "progress": 0,
            "step": 0,
            "started_at": now,
            "worker": worker,
        }
        if created is not None:
            fields["timings"] = {"queued_s": max(0.0, now - float(as_text(created)))}
        call = transition_call(
            job_id,
            allowed=[JobStatus.queued],
            event="started",
            fields=fields,
            queued="rem",
            running="add",
            score=now,
            incr="attempts",
        )
        return (yield from self._transition(call)) > 0

    def _mark_progress(self, job_id: str, step: int, total_steps: int) -> Ops[bool]:
        """Denoising step `step` of `total_steps` done (progress 0-90 %)."""
        total = max(1, int(total_steps))
        percent = int(DENOISING_PERCENT * min(int(step), total) / total)
        fields = {
            "stage": Stage.denoising,
            "step": int(step),
            "total_steps": total,
            "progress": percent,
        }
        call = transition_call(
            job_id, allowed=[JobStatus.in_progress], event="progress", fields=fields
        )
        return (yield from self._transition(call)) > 0

    def _mark_stage(self, job_id: str, stage: Stage | str) -> Ops[bool]:
        """Entered `decoding` or `encoding` (progress 92 / 96 %)."""
        stage = Stage(stage)
        fields = {"stage": stage, "progress": STAGE_PERCENT.get(stage, 0)}
        call = transition_call(
            job_id, allowed=[JobStatus.in_progress], event="stage", fields=fields
        )
        return (yield from self._transition(call)) > 0

    def _mark_completed(
        self,
        job_id: str,
        *,
        files: list[str],
        timings: Optional[dict] = None,
        density: Optional[float] = None,
        attention: Optional[dict] = None,
        allowed: Iterable[JobStatus] = (JobStatus.in_progress,),
    ) -> Ops[bool]:
        """in_progress -> completed; results kept for `retention_s`. `attention`: the VMoBA
        settings that ran and where each came from. The janitor also completes waiting jobs
        whose result it finds in storage (`allowed`)."""
        return (
            yield from self._end(
                job_id,
                JobStatus.completed,
                allowed,
                stage=Stage.done,
                progress=100,
                files=list(files),
                timings=timings or {},
                density=density,
                attention=attention or {},
            )
        )

    def _mark_failed(
        self, job_id: str, code: ErrorCode | str, message: str, timings: Optional[dict] = None
    ) -> Ops[bool]:
        """queued|in_progress -> failed with an error code (`status.ErrorCode`)."""
        return (
            yield from self._end(
                job_id,
                JobStatus.failed,
                RUNNABLE,
                error_code=enum_value(code),
                error_message=str(message),
                timings=timings or {},
            )
        )

    def _mark_cancelled(
        self,
        job_id: str,
        message: str = "cancelled by request",
        allowed: Iterable[JobStatus] = RUNNABLE,
    ) -> Ops[bool]:
        """`allowed` (queued|in_progress) -> cancelled (error code `cancelled`). The API cancels
        only waiting jobs itself (`allowed=(JobStatus.queued,)`); a running one is cancelled by
        its worker, which sees the flag set by `request_cancel`."""
        return (
            yield from self._end(
                job_id,
                JobStatus.cancelled,
                allowed,
                error_code=ErrorCode.cancelled.value,
                error_message=str(message),
            )
        )

    def _mark_requeued(self, job_id: str, reason: str = "", lost: bool = False) -> Ops[bool]:
        """in_progress -> queued again (SIGTERM, or with `lost` a retry after its worker died,
        counted in the record's `lost`). The caller enqueues the RQ job again."""
        created = yield lambda r: r.hget(job_key(job_id), "created_at")
        score = float(as_text(created)) if created is not None else time.time()
        fields = {
            "status": JobStatus.queued,
            "stage": Stage.queued,
            "progress": 0,
            "step": 0,
            "worker": None,
            "started_at": None,
        }
        call = transition_call(
            job_id,
            allowed=[JobStatus.in_progress],
            event="requeued",
            fields=fields,
            queued="add",
            running="rem",
            score=score,
            incr="lost" if lost else "",
            reason=reason,
        )
        return (yield from self._transition(call)) > 0

    def _restore(
        self, job_id: str, fields: dict, *, created_at: float, expires_at: float
    ) -> Ops[bool]:
        """Put back a finished job's record that Redis lost (built by the janitor from the
        job's sidecar in storage); False when a record exists."""
        call = restore_call(
            check_job_id(job_id), fields, created_at=created_at, expires_at=expires_at
        )
        return bool((yield self._script(self._restore_script, call)))

    def _end(
        self, job_id: str, status: JobStatus, allowed: Iterable[JobStatus], **extra: Any
    ) -> Ops[bool]:
        seq = yield from self._transition(
            end_call(job_id, status, allowed, self.retention_s, **extra)
        )
        if seq > 0:
            rec = yield from self._get(job_id)
            yield from metrics.record_end(rec, status.value)
        return seq > 0

    # -- cancel ---------------------------------------------------------------------------------

    def _request_cancel(self, job_id: str) -> Ops[None]:
        """Raise the cancel flag (the worker checks it at every step)."""
        yield lambda r: r.set(cancel_key(job_id), "1", ex=self.retention_s + RECORD_GRACE_S)

    def _is_cancel_requested(self, job_id: str) -> Ops[bool]:
        return bool((yield lambda r: r.exists(cancel_key(job_id))))

    # -- input image ----------------------------------------------------------------------------

    def _put_input_image(self, job_id: str, png: bytes) -> Ops[None]:
        """Keep an image-to-video job's input image with the job (deleted with it)."""
        ttl = self.retention_s + RECORD_GRACE_S
        yield lambda r: r.set(input_key(check_job_id(job_id)), png, ex=ttl)

    def _get_input_image(self, job_id: str) -> Ops[Optional[bytes]]:
        return (yield lambda r: r.get(input_key(job_id)))

    # -- workers --------------------------------------------------------------------------------

    def _heartbeat(
        self, name: str, info: Optional[dict] = None, ttl_s: float = heartbeats.HEARTBEAT_TTL_S
    ) -> Ops[None]:
        """Worker `name` is alive for `ttl_s` more seconds (see `contract.heartbeats`)."""
        yield from heartbeats.beat(name, info, ttl_s)

    def _drop_worker(self, name: str) -> Ops[None]:
        """Forget a worker now (clean shutdown)."""
        yield from heartbeats.drop(name)

    def _worker_alive(self, name: str) -> Ops[bool]:
        return (yield from heartbeats.alive(name))

    def _worker_info(self, name: str) -> Ops[Optional[dict]]:
        """The heartbeat info of a live worker (what it runs now: `job_id`), else None."""
        return (yield from heartbeats.info(name))

    def _live_workers(self, queue: Optional[str] = None) -> Ops[list[dict]]:
        """Heartbeat infos of workers alive now (on `queue`, if given)."""
        return (yield from heartbeats.live(queue))

    # -- delete and metrics ---------------------------------------------------------------------

    def _delete(self, job_id: str) -> Ops[bool]:
        """Remove a job's record, index entries, events and flag (not its files). False if it
        did not exist."""
        owner = as_text((yield lambda r: r.hget(job_key(job_id), "owner")))

        def build(pipe: Any) -> None:
            pipe.delete(job_key(job_id))
            pipe.delete(replay_key(job_id), cancel_key(job_id), input_key(job_id))
            for key in (INDEX_KEY, QUEUED_KEY, RUNNING_KEY, EXPIRY_KEY):
                pipe.zrem(key, job_id)
            if owner:
                pipe.zrem(owner_index_key(owner), job_id)

        return bool((yield pipelined(build, transaction=True))[0])

    def _metrics_snapshot(self) -> Ops[dict]:
        """Job counters and histograms, queue depth and jobs running (see `contract.metrics`)."""
        return (yield from metrics.snapshot())


class JobStore(_JobOps):
    """The job store over a synchronous `redis.Redis` (the worker, the CLI, tests)."""

    create = sync_method(_JobOps._create)
    get = sync_method(_JobOps._get)
    get_full = sync_method(_JobOps._get_full)
    list = sync_method(_JobOps._list)
    queue_position = sync_method(_JobOps._queue_position)
    queue_depth = sync_method(_JobOps._queue_depth)
    running_jobs = sync_method(_JobOps._running_jobs)
    expired = sync_method(_JobOps._expired)
    events_since = sync_method(_JobOps._events_since)
    update = sync_method(_JobOps._update)
    publish_event = sync_method(_JobOps._publish_event)
    mark_started = sync_method(_JobOps._mark_started)
    mark_progress = sync_method(_JobOps._mark_progress)
    mark_stage = sync_method(_JobOps._mark_stage)
    mark_completed = sync_method(_JobOps._mark_completed)
    mark_failed = sync_method(_JobOps._mark_failed)
    mark_cancelled = sync_method(_JobOps._mark_cancelled)
    mark_requeued = sync_method(_JobOps._mark_requeued)
    restore = sync_method(_JobOps._restore)
    request_cancel = sync_method(_JobOps._request_cancel)
    is_cancel_requested = sync_method(_JobOps._is_cancel_requested)
    put_input_image = sync_method(_JobOps._put_input_image)
    get_input_image = sync_method(_JobOps._get_input_image)
    heartbeat = sync_method(_JobOps._heartbeat)
    drop_worker = sync_method(_JobOps._drop_worker)
    worker_alive = sync_method(_JobOps._worker_alive)
    worker_info = sync_method(_JobOps._worker_info)
    live_workers = sync_method(_JobOps._live_workers)
    delete = sync_method(_JobOps._delete)
    metrics_snapshot = sync_method(_JobOps._metrics_snapshot)


class AsyncJobStore(_JobOps):
    """The same job store over `redis.asyncio.Redis` (the API): every method is a coroutine."""

    create = async_method(_JobOps._create)
    get = async_method(_JobOps._get)
    get_full = async_method(_JobOps._get_full)
    list = async_method(_JobOps._list)
    queue_position = async_method(_JobOps._queue_position)
    queue_depth = async_method(_JobOps._queue_depth)
    running_jobs = async_method(_JobOps._running_jobs)
    expired = async_method(_JobOps._expired)
    events_since = async_method(_JobOps._events_since)
    update = async_method(_JobOps._update)
    publish_event = async_method(_JobOps._publish_event)
    mark_started = async_method(_JobOps._mark_started)
    mark_progress = async_method(_JobOps._mark_progress)
    mark_stage = async_method(_JobOps._mark_stage)
    mark_completed = async_method(_JobOps._mark_completed)
    mark_failed = async_method(_JobOps._mark_failed)
    mark_cancelled = async_method(_JobOps._mark_cancelled)
    mark_requeued = async_method(_JobOps._mark_requeued)
    restore = async_method(_JobOps._restore)
    request_cancel = async_method(_JobOps._request_cancel)
    is_cancel_requested = async_method(_JobOps._is_cancel_requested)
    put_input_image = async_method(_JobOps._put_input_image)
    get_input_image = async_method(_JobOps._get_input_image)
    heartbeat = async_method(_JobOps._heartbeat)
    drop_worker = async_method(_JobOps._drop_worker)
    worker_alive = async_method(_JobOps._worker_alive)
    worker_info = async_method(_JobOps._worker_info)
    live_workers = async_method(_JobOps._live_workers)
    delete = async_method(_JobOps._delete)
    metrics_snapshot = async_method(_JobOps._metrics_snapshot)
