"""The janitor: no job left in limbo, no result kept past its retention.

Runs in every launcher (`python -m worker`) every `JANITOR_INTERVAL_S`, under a Redis lock so one
sweep runs at a time across hosts; `python -m worker.janitor` runs one sweep by hand. A sweep:

1. **Dead workers' jobs.** A worker is alive while its heartbeat key `vmoba:worker:<name>`
   exists (TTL `HEARTBEAT_TTL_S`, refreshed every `HEARTBEAT_INTERVAL_S` by a thread of the
   worker, busy or not). A job `in_progress` on a worker that is not alive, an RQ job in the
   started registry of a worker that is not alive (a death between RQ taking the job and our
   record saying so; the worker is the one RQ's execution names, written with the registry
   entry, not the job's `worker_name`, written a moment later), and a job `in_progress` on a
   live worker whose heartbeat says it runs something else (Redis lost an update, e.g. a
   restart) is lost. A lost job is, in this order:
   **completed** when its result (video and sidecar) is in storage (it finished; only the record
   did not say so: a finished video is never deleted here); **cancelled** when a cancel was
   requested (e.g. the launcher stopped a worker that did not honour it in time); re-queued at
   the front when its workers died fewer than `LOST_JOB_RETRIES` times before (graceful
   re-queues, SIGTERM, do not count: the record's `lost`); else failed with `worker_lost` and
   its partial files removed. RQ's own state is made to agree (started registry entries removed;
   job re-enqueued, deleted, or moved to RQ's failed registry). The launcher also calls
   `reap_worker` the moment one of its workers exits, so local deaths are handled at once rather
   than after the heartbeat TTL.
2. **Orphaned queued jobs.** A record `queued` for longer than `ORPHAN_GRACE_S` whose RQ job is
   not waiting in its queue (gone, failed, stopped or finished: e.g. Redis lost the enqueue,
   or RQ's maintenance failed a job stuck in its intermediate queue; still queued in RQ but in
   no queue only once it has looked so for `HEARTBEAT_TTL_S`: a worker taking the job leaves
   it so for a moment) would never start: its result is looked for in storage (completed if
   there), else it is enqueued again from the record (which holds the validated request), at
   most `ORPHAN_REQUEUES` times, then failed with `worker_lost` (`cancelled` if RQ cancelled
   it), so clients stop waiting.
3. **Retention.** Finished jobs past `expires_at`: files first (with object storage, every
   object under the job's prefix), then the record.
4. **Leftovers.** Staging directories of killed workers older than `STAGING_MAX_AGE_S` (and, with
   object storage, multipart uploads they left open), and job directories or prefixes with no
   record (deleted jobs) older than the same age. A complete result with no record whose
   retention has not run out is a finished job whose record Redis lost: its record is put back
   (completed, with its owner) from the sidecar instead.
5. **Start-up.** The first sweep of a janitor also completes every waiting record whose result
   is in storage (Redis lost the completion and the job was queued again).

Storage being unreachable (`StorageUnavailable`) skips the file passes of this sweep: records of
expired jobs stay until their files are gone, so the next sweep tries again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis as redis_lib
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from contract.enqueue import enqueue
from contract.files import INPUT_FILE, META_FILE, THUMBNAIL_FILE, VIDEO_FILE
from contract.keys import JANITOR_LOCK_KEY, QUEUED_KEY, job_key
from contract.record import as_text
from contract.status import ErrorCode
from contract.status import JobStatus as JobStatus_
from contract.storage import Storage, StorageUnavailable
from contract.store import JobStore
from contract.supervise import setup_logging

from .settings import WorkerSettings
from .storage import open_storage

log = logging.getLogger("worker.janitor")

# Expired jobs removed per sweep (the next sweep continues).
EXPIRED_BATCH = 500
# RQ keeps failures of lost jobs this long (they are diagnostics; our record is the truth).
RQ_FAILURE_TTL_S = 7 * 24 * 3600
# An orphaned queued job is enqueued again at most this often before it fails (a job that RQ
# keeps failing before it starts must not loop forever).
ORPHAN_REQUEUES = 3
ORPHAN_COUNT_FIELD = "orphan_requeues"


@dataclass
class SweepReport:
    requeued: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    orphaned: list = field(default_factory=list)
    expired: list = field(default_factory=list)
    staging: list = field(default_factory=list)
    stray_dirs: list = field(default_factory=list)
    recovered: list = field(default_factory=list)  # finished jobs found in storage
    cancelled: list = field(default_factory=list)  # lost jobs whose cancel was requested

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in self.__dataclass_fields__)


class Janitor:
    def __init__(self, redis, store: JobStore, storage: Storage, settings: WorkerSettings):
        self.redis = redis
        self.store = store
        self.storage = storage
        self.settings = settings
        self.queues = [Queue(name, connection=redis) for name in settings.queues]
        self.started_up = False  # the first sweep also reconciles waiting records with storage
        # Jobs RQ says are queued that no queue holds, and when a sweep first saw them so.
        self.orphan_suspects: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Janitor:
        client = redis_lib.Redis.from_url(settings.REDIS_URL, socket_timeout=30)
        return cls(
            client,
            JobStore(client, retention_s=settings.RETENTION_S),
            open_storage(settings),
            settings,
        )

    # -- entry points --------------------------------------------------------------------------
    def sweep(self, *, now: float | None = None) -> SweepReport | None:
        """One pass over everything (see the module docstring); None if another janitor holds
        the lock."""
        ttl = max(5, int(self.settings.JANITOR_INTERVAL_S * 3))
        token = f"{time.time()}"
        if not self.redis.set(JANITOR_LOCK_KEY, token, nx=True, ex=ttl):
            return None
        try:
            report = SweepReport()
            self.reap_dead(report)
            self.reap_stuck(report)
            self.fail_orphans(report, now=now)
            report.staging = self.storage.clean_staging(self.settings.STAGING_MAX_AGE_S)
            try:
                if not self.started_up:
                    self.complete_waiting_from_storage(report)
                    self.started_up = True
                self.remove_expired(report, now=now)
                self.remove_stray_dirs(report, now=now)
            except StorageUnavailable as exc:
                log.warning("janitor: results storage unavailable, files left for later: %s", exc)
            if report:
                log.info("janitor: %s", {k: v for k, v in report.__dict__.items() if v})
            return report
        finally:
            if self.redis.get(JANITOR_LOCK_KEY) in (token, token.encode()):
                self.redis.delete(JANITOR_LOCK_KEY)

    def reap_worker(self, name: str, reason: str = "exited") -> SweepReport:
        """Worker `name` is known dead (the launcher saw it exit): forget its heartbeat and deal
        with its job now."""
        self.store.drop_worker(name)
        report = SweepReport()
        self.reap_dead(report, only=name, reason=reason)
        return report

    # -- 1. dead workers -----------------------------------------------------------------------
    def reap_dead(
        self, report: SweepReport, *, only: str | None = None, reason: str = "its heartbeat stopped"
    ) -> None:
        alive: dict[str, bool] = {}

        def is_alive(worker: str | None) -> bool:
            if not worker:
                return False
            if only is not None:
                return worker != only
            if worker not in alive:
                alive[worker] = self.store.worker_alive(worker)
            return alive[worker]

        seen = set()
        for job_id in self.store.running_jobs():
            rec = self.store.get(job_id)
            if rec is None or rec.status != "in_progress":
                continue
            if only is not None and rec.worker != only:
                continue
            if is_alive(rec.worker):
                continue
            seen.add(job_id)
            self._lost(rec, f"worker {rec.worker} died ({reason})", report)
        for queue in self.queues:
            registry = StartedJobRegistry(queue=queue)
            for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
                if job_id in seen:
                    continue
                job = self._fetch(job_id)
                still_started, worker = self._execution_worker(registry, job_id, execution_id)
                if not still_started:
                    continue  # the execution ended since the registry was read
                if worker is None and job is not None:  # its execution expired (job timeout)
                    worker = job.worker_name
                if only is not None and worker != only:
                    continue
                if is_alive(worker):
                    continue
                seen.add(job_id)
                rec = self.store.get(job_id)
                if rec is not None and rec.status in ("queued", "in_progress"):
                    if rec.status == "in_progress" and is_alive(rec.worker):
                        continue  # re-queued and started again elsewhere
                    self._lost(rec, f"worker {worker or '?'} died ({reason})", report, job=job)
                else:
                    # Our record is final (or gone): only RQ still thinks it runs.
                    self._rq_fail(job_id, job, f"worker {worker} died after the job ended")

    def reap_stuck(self, report: SweepReport) -> None:
        """Jobs `in_progress` on a live worker whose heartbeat, written well after the job
        started, names another job or none: the worker is not running them (e.g. Redis lost
        an update in a restart, or the worker never learnt it had started the job)."""
        margin = 2 * self.settings.HEARTBEAT_INTERVAL_S + 1.0
        for job_id in self.store.running_jobs():
            rec = self.store.get(job_id)
            if rec is None or rec.status != "in_progress" or not rec.worker:
                continue
            info = self.store.worker_info(rec.worker)
            if info is None or info.get("job_id") == job_id:
                continue  # dead (reap_dead's) or running it
            if float(info.get("ts") or 0) <= (rec.started_at or 0) + margin:
                continue  # the heartbeat may predate the job's start
            self._lost(rec, f"worker {rec.worker} is alive but does not run the job", report)

    def _lost(self, rec, why: str, report: SweepReport, job: Job | None = None) -> None:
        job = job if job is not None else self._fetch(rec.id)
        try:
            if self._recover(rec, job, report):
                return
        except StorageUnavailable as exc:
            # A finished result may be there: decide once storage answers (next sweep).
            log.warning("job %s: %s; storage unavailable, deciding later: %s", rec.id, why, exc)
            return
        if self.store.is_cancel_requested(rec.id):
            message = f"cancelled by request; {why} before the job stopped"
            if self.store.mark_cancelled(rec.id, message):
                self._remove_partial(rec.id)
                report.cancelled.append(rec.id)
                log.warning("job %s cancelled: %s", rec.id, why)
            self._rq_fail(rec.id, job, message)
            return
        if rec.status == "queued":
            # The worker died before our record said it started: nothing ran, so run it again
            # (this does not count against LOST_JOB_RETRIES).
            self._rq_requeue(rec, job)
            report.requeued.append(rec.id)
            log.warning("job %s re-queued: %s before it started", rec.id, why)
            return
        started = max(rec.attempts, 1)
        if rec.lost < self.settings.LOST_JOB_RETRIES:
            if self.store.mark_requeued(rec.id, reason=f"worker_lost: {why}", lost=True):
                self._rq_requeue(rec, job)
                report.requeued.append(rec.id)
                log.warning("job %s re-queued: %s (attempt %d)", rec.id, why, started)
            return
        message = (
            f"{why} while running the job (at step {rec.step} of {rec.total_steps}, "
            f"attempt {started}); "
            + (
                "not retried (LOST_JOB_RETRIES=0)"
                if self.settings.LOST_JOB_RETRIES == 0
                else f"already retried {rec.lost} time(s)"
            )
        )
        if self.store.mark_failed(rec.id, ErrorCode.worker_lost.value, message):
            self._remove_partial(rec.id)
            report.lost.append(rec.id)
            log.warning("job %s failed: %s", rec.id, message)
        self._rq_fail(rec.id, job, message)

    def _remove_partial(self, job_id: str) -> None:
        """Files of a job that did not finish (a complete result was ruled out before)."""
        try:
            self.storage.remove(job_id)
        except StorageUnavailable as exc:  # retention removes them with the record
            log.warning("job %s: could not remove its files: %s", job_id, exc)

    def _recover(self, rec, job: Job | None, report: SweepReport) -> bool:
        """Complete a waiting or running record whose result is in storage; True if it is.
        `StorageUnavailable` when storage cannot tell."""
        meta = self.storage.finished_result(rec.id)
        if meta is None:
            return False
        if self.store.mark_completed(
            rec.id, allowed=(JobStatus_.queued, JobStatus_.in_progress), **completed_fields(meta)
        ):
            report.recovered.append(rec.id)
            log.warning(
                "job %s completed: its result was in storage, its record said %s",
                rec.id,
                rec.status,
            )
        self._rq_forget(rec.id, job)
        return True

    def complete_waiting_from_storage(self, report: SweepReport) -> None:
        """Waiting records whose result is already in storage (Redis lost the completion)."""
        for job_id in [as_text(x) for x in self.redis.zrange(QUEUED_KEY, 0, -1)]:
            rec = self.store.get(job_id)
            if rec is not None and rec.status == "queued":
                self._recover(rec, self._fetch(job_id), report)

    # -- 2. orphans ----------------------------------------------------------------------------
    def fail_orphans(self, report: SweepReport, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        cutoff = now - self.settings.ORPHAN_GRACE_S
        suspects, self.orphan_suspects = self.orphan_suspects, {}
        ids = [as_text(x) for x in self.redis.zrangebyscore(QUEUED_KEY, "-inf", cutoff)]
        for job_id in ids:
            job = self._fetch(job_id)
            status = job.get_status(refresh=False) if job is not None else None
            if status in (JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
                continue
            if status == JobStatus.QUEUED and job is not None and self._waiting_in_rq(job):
                continue
            if status == JobStatus.CANCELED:
                if self.store.mark_cancelled(job_id, "cancelled in the queue"):
                    report.orphaned.append(job_id)
                continue
            rec = self.store.get(job_id)
            if rec is None or rec.status != "queued":
                continue
            if status == JobStatus.QUEUED:
                if self._started_entries(job_id):
                    continue  # a worker is taking it: reap_dead's (alive or not decides)
                if not self._still_lost(job_id, now, suspects):
                    continue
            try:
                if self._recover(rec, job, report):
                    continue
            except StorageUnavailable as exc:
                log.warning("job %s: storage unavailable, deciding later: %s", job_id, exc)
                continue
            what = "is gone" if status is None else f"is {status.value}"  # None: no job
            if status == JobStatus.QUEUED:
                what = "is not in its queue"
            if int(self.redis.hincrby(job_key(job_id), ORPHAN_COUNT_FIELD, 1)) <= ORPHAN_REQUEUES:
                self._rq_requeue(rec, job)
                report.requeued.append(job_id)
                log.warning("job %s enqueued again: its RQ job %s", job_id, what)
                continue
            detail = ""
            if job is not None and status == JobStatus.FAILED:
                latest = job.latest_result()
                if latest is not None and latest.exc_string:
                    detail = ": " + " ".join(latest.exc_string.strip().splitlines()[-1:])[:300]
            message = (
                f"the queue lost this job before it started (its RQ job {what}{detail}; "
                f"enqueued again {ORPHAN_REQUEUES} times)"
            )
            if self.store.mark_failed(job_id, ErrorCode.worker_lost.value, message):
                report.orphaned.append(job_id)
                log.warning("job %s failed: %s", job_id, message)

    def _still_lost(self, job_id: str, now: float, suspects: dict[str, float]) -> bool:
        """Whether a job RQ says is queued, that no queue holds and no started registry names,
        has looked so on every sweep of this janitor for `HEARTBEAT_TTL_S`. A worker taking a
        job leaves it so for a moment: a worker of several queues pops it (LPOP) and registers
        it as started in its next transaction, and a sweep's reads may fall in between (or
        between its own reads, as RQ moves it on). A live worker is done with that long before
        its heartbeat would expire: a job still looking so then is lost."""
        first_seen = suspects.get(job_id, now)
        if now - first_seen >= self.settings.HEARTBEAT_TTL_S:
            return True
        self.orphan_suspects[job_id] = first_seen
        return False

    def _waiting_in_rq(self, job: Job) -> bool:
        """Whether RQ's job sits in its queue (or is being handed to a worker)."""
        queue = self._queue_for(job)
        keys = (queue.key, queue.intermediate_queue_key)
        return any(self.redis.lpos(key, job.id) is not None for key in keys)

    # -- 3. retention --------------------------------------------------------------------------
    def remove_expired(self, report: SweepReport, *, now: float | None = None) -> None:
        for job_id in self.store.expired(now=now, limit=EXPIRED_BATCH):
            self.storage.remove(job_id)  # files first: a record never points at missing files
            self.store.delete(job_id)
            job = self._fetch(job_id)
            if job is not None:
                job.delete(remove_from_queue=True)
            report.expired.append(job_id)

    # -- 4. leftovers --------------------------------------------------------------------------
    def remove_stray_dirs(self, report: SweepReport, *, now: float | None = None) -> None:
        """Files with no record: a finished job's record is put back (Redis lost it), the rest
        (deleted or expired jobs) removed once `STAGING_MAX_AGE_S` old."""
        ids = self.storage.job_ids()
        if not ids:
            return
        now = time.time() if now is None else now
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(job_key(job_id))
        for job_id, exists in zip(ids, pipe.execute()):
            if exists:
                continue
            meta = self.storage.finished_result(job_id)
            if meta is not None and self._restore(job_id, meta, now):
                report.recovered.append(job_id)
                continue
            if self.storage.age_s(job_id) > self.settings.STAGING_MAX_AGE_S:
                self.storage.remove(job_id)
                report.stray_dirs.append(job_id)

    def _restore(self, job_id: str, meta: dict, now: float) -> bool:
        """Put back the completed record of a finished job from its sidecar, unless its
        retention has run out."""
        completed_at = float(meta.get("created_at") or 0)
        expires_at = completed_at + self.settings.RETENTION_S
        if expires_at <= now:
            return False
        request = meta.get("request") or {}
        steps = int(request.get("num_inference_steps") or 0)
        fields = {
            "status": "completed",
            "stage": "done",
            "progress": 100,
            "step": steps,
            "total_steps": steps,
            "request": request,
            "seed": meta.get("seed"),
            "model": request.get("model") or "",
            "completed_at": completed_at,
            "attempts": int((meta.get("worker") or {}).get("attempt") or 1),
            "seq": 0,
            "owner": meta.get("owner") or "",
            **completed_fields(meta),
        }
        created_at = float(meta.get("submitted_at") or completed_at)
        if not self.store.restore(job_id, fields, created_at=created_at, expires_at=expires_at):
            return False
        log.warning("job %s: its record was lost; put back as completed from its sidecar", job_id)
        return True

    # -- RQ side -------------------------------------------------------------------------------
    def _fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return None

    def _execution_worker(
        self, registry: StartedJobRegistry, job_id: str, execution_id: str
    ) -> tuple[bool, str | None]:
        """Whether the started registry still holds this execution, and the worker RQ started
        it on. That name is read from RQ's execution, which RQ writes in the same transaction
        as the registry entry when a worker takes a job; the job's own `worker_name` is only
        written in RQ's next transaction, and until then it is empty, or names the worker of an
        earlier run of a re-queued job (maybe dead): the entry would look like a dead
        worker's."""
        execution = Execution(execution_id, job_id, self.redis)
        with self.redis.pipeline() as pipe:  # one snapshot: the two go together
            pipe.zscore(registry.key, execution.composite_key)
            pipe.hget(execution.key, "worker_name")
            score, worker = pipe.execute()
        return score is not None, as_text(worker) or None

    def _started_entries(self, job_id: str) -> list[tuple[str, list]]:
        """The job's `<job_id>:<execution>` entries in the started registries, by key."""
        found = []
        for queue in self.queues:
            key = StartedJobRegistry(queue=queue).key
            entries = [
                m for m in self.redis.zrange(key, 0, -1) if as_text(m).split(":", 1)[0] == job_id
            ]
            if entries:
                found.append((key, entries))
        return found

    def _drop_started_entries(self, job_id: str) -> None:
        """Remove every `<job_id>:<execution>` entry from the started registries (RQ would
        otherwise fail the job again when the entry's day-long TTL runs out)."""
        for key, entries in self._started_entries(job_id):
            self.redis.zrem(key, *entries)

    def _rq_requeue(self, rec, job: Job | None) -> None:
        self._drop_started_entries(rec.id)
        queue = self._queue_for(job)
        if job is not None:
            queue.enqueue_job(job, at_front=True)
            return
        # RQ's job is gone (expired or deleted): enqueue it again from our record, which holds
        # the validated request as it was enqueued.
        enqueue(
            queue,
            rec.id,
            {**rec.request, "job_id": rec.id},
            at_front=True,
            result_ttl_s=self.settings.RQ_RESULT_TTL_S,
        )

    def _rq_forget(self, job_id: str, job: Job | None) -> None:
        """RQ has nothing left to do for a job (it finished): out of its queue and registries."""
        self._drop_started_entries(job_id)
        if job is not None:
            job.delete(remove_from_queue=True)

    def _rq_fail(self, job_id: str, job: Job | None, message: str) -> None:
        self._drop_started_entries(job_id)
        if job is None:
            return
        with self.redis.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job.failed_job_registry.add(
                job, ttl=RQ_FAILURE_TTL_S, exc_string=message, pipeline=pipe
            )
            pipe.execute()

    def _queue_for(self, job: Job | None) -> Queue:
        if job is not None and job.origin:
            for queue in self.queues:
                if queue.name == job.origin:
                    return queue
            return Queue(job.origin, connection=self.redis)
        return self.queues[0]


def completed_fields(meta: dict) -> dict:
    """`mark_completed`'s arguments from a finished job's sidecar (`worker.jobs` writes it)."""
    files = [
        (meta.get("video") or {}).get("file") or VIDEO_FILE,
        (meta.get("thumbnail") or {}).get("file") or THUMBNAIL_FILE,
        META_FILE,
    ]
    if meta.get("task") == "i2v":
        files.append(INPUT_FILE)
    return {
        "files": files,
        "timings": {k: v for k, v in (meta.get("timings") or {}).items() if _number(v)},
        "density": meta.get("density") if _number(meta.get("density")) else None,
        "attention": {
            "settings": meta.get("attention") or {},
            "sources": meta.get("attention_sources") or {},
        },
    }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main() -> int:
    """`python -m worker.janitor`: one sweep now, report printed as JSON."""
    import json

    settings = WorkerSettings()
    setup_logging(settings.LOG_LEVEL)
    report = Janitor.from_settings(settings).sweep()
    print(
        json.dumps(
            report.__dict__ if report is not None else {"skipped": "another janitor is running"}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
