"""The janitor: no job left in limbo, no result kept past its retention.

Runs in every launcher (`python -m worker`) every `JANITOR_INTERVAL_S`, under a Redis lock so one
sweep runs at a time across hosts; `python -m worker.janitor` runs one sweep by hand. A sweep:

1. **Dead workers' jobs.** A worker is alive while its heartbeat key `vmoba:worker:<name>`
   exists (TTL `HEARTBEAT_TTL_S`, refreshed every `HEARTBEAT_INTERVAL_S` by a thread of the
   worker, busy or not). A job `in_progress` on a worker that is not alive, and an RQ job in the
   started registry of a worker that is not alive (a death between RQ taking the job and our
   record saying so), is lost: re-queued at the front if it has been started at most
   `LOST_JOB_RETRIES` times, else failed with `worker_lost` and its files removed. RQ's own
   state is made to agree (started registry entries removed; job re-enqueued, or moved to RQ's
   failed registry). The launcher also calls `reap_worker` the moment one of its workers exits,
   so local deaths are handled at once rather than after the heartbeat TTL.
2. **Orphaned queued jobs.** A record `queued` for longer than `ORPHAN_GRACE_S` whose RQ job is
   gone, failed, stopped or finished (e.g. RQ's maintenance failed a job stuck in its
   intermediate queue) can never start: it fails with `worker_lost` (`cancelled` if RQ cancelled
   it), so clients stop waiting.
3. **Retention.** Finished jobs past `expires_at`: files first (with object storage, every
   object under the job's prefix), then the record.
4. **Leftovers.** Staging directories of killed workers older than `STAGING_MAX_AGE_S` (and, with
   object storage, multipart uploads they left open), and job directories or prefixes with no
   record (deleted jobs) older than the same age.

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
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from contract.enqueue import enqueue
from contract.keys import JANITOR_LOCK_KEY, QUEUED_KEY, job_key
from contract.record import as_text
from contract.status import ErrorCode
from contract.storage import Storage, StorageUnavailable
from contract.store import JobStore
from contract.supervise import setup_logging

from .settings import WorkerSettings
from .storage import open_storage

log = logging.getLogger("worker.janitor")

# A queued record younger than this may still be on its way into RQ (the API creates the record,
# then enqueues): leave it alone.
ORPHAN_GRACE_S = 60.0
# Expired jobs removed per sweep (the next sweep continues).
EXPIRED_BATCH = 500
# RQ keeps failures of lost jobs this long (they are diagnostics; our record is the truth).
RQ_FAILURE_TTL_S = 7 * 24 * 3600


@dataclass
class SweepReport:
    requeued: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    orphaned: list = field(default_factory=list)
    expired: list = field(default_factory=list)
    staging: list = field(default_factory=list)
    stray_dirs: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in self.__dataclass_fields__)


class Janitor:
    def __init__(self, redis, store: JobStore, storage: Storage, settings: WorkerSettings):
        self.redis = redis
        self.store = store
        self.storage = storage
        self.settings = settings
        self.queues = [Queue(name, connection=redis) for name in settings.queues]

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
            self.fail_orphans(report, now=now)
            report.staging = self.storage.clean_staging(self.settings.STAGING_MAX_AGE_S)
            try:
                self.remove_expired(report, now=now)
                self.remove_stray_dirs(report)
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
            for job_id, _execution in registry.get_job_and_execution_ids(cleanup=False):
                if job_id in seen:
                    continue
                job = self._fetch(job_id)
                worker = job.worker_name if job is not None else None
                if only is not None and worker != only:
                    continue
                if job is not None and is_alive(worker):
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

    def _lost(self, rec, why: str, report: SweepReport, job: Job | None = None) -> None:
        job = job if job is not None else self._fetch(rec.id)
        if rec.status == "queued":
            # The worker died before our record said it started: nothing ran, so run it again
            # (this does not count against LOST_JOB_RETRIES).
            self._rq_requeue(rec, job)
            report.requeued.append(rec.id)
            log.warning("job %s re-queued: %s before it started", rec.id, why)
            return
        started = max(rec.attempts, 1)
        if started <= self.settings.LOST_JOB_RETRIES:
            if self.store.mark_requeued(rec.id, reason=f"worker_lost: {why}"):
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
                else f"already retried {started - 1} time(s)"
            )
        )
        if self.store.mark_failed(rec.id, ErrorCode.worker_lost.value, message):
            try:
                self.storage.remove(rec.id)
            except StorageUnavailable as exc:  # retention removes them with the record
                log.warning("job %s: could not remove its files: %s", rec.id, exc)
            report.lost.append(rec.id)
            log.warning("job %s failed: %s", rec.id, message)
        self._rq_fail(rec.id, job, message)

    # -- 2. orphans ----------------------------------------------------------------------------
    def fail_orphans(self, report: SweepReport, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        cutoff = now - ORPHAN_GRACE_S
        ids = [as_text(x) for x in self.redis.zrangebyscore(QUEUED_KEY, "-inf", cutoff)]
        for job_id in ids:
            job = self._fetch(job_id)
            status = job.get_status(refresh=False) if job is not None else None
            if status in (
                JobStatus.QUEUED,
                JobStatus.STARTED,
                JobStatus.SCHEDULED,
                JobStatus.DEFERRED,
            ):
                continue
            if status == JobStatus.CANCELED:
                if self.store.mark_cancelled(job_id, "cancelled in the queue"):
                    report.orphaned.append(job_id)
                continue
            what = "is gone" if status is None else f"is {status.value}"  # None: no job
            detail = ""
            if job is not None and status == JobStatus.FAILED:
                latest = job.latest_result()
                if latest is not None and latest.exc_string:
                    detail = ": " + " ".join(latest.exc_string.strip().splitlines()[-1:])[:300]
            message = f"the queue lost this job before it started (its RQ job {what}{detail})"
            if self.store.mark_failed(job_id, ErrorCode.worker_lost.value, message):
                report.orphaned.append(job_id)
                log.warning("job %s failed: %s", job_id, message)

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
    def remove_stray_dirs(self, report: SweepReport) -> None:
        ids = self.storage.job_ids()
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(job_key(job_id))
        for job_id, exists in zip(ids, pipe.execute()):
            if not exists and self.storage.age_s(job_id) > self.settings.STAGING_MAX_AGE_S:
                self.storage.remove(job_id)
                report.stray_dirs.append(job_id)

    # -- RQ side -------------------------------------------------------------------------------
    def _fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return None

    def _drop_started_entries(self, job_id: str) -> None:
        """Remove every `<job_id>:<execution>` entry from the started registries (RQ would
        otherwise fail the job again when the entry's day-long TTL runs out)."""
        for queue in self.queues:
            registry = StartedJobRegistry(queue=queue)
            stale = [
                m
                for m in self.redis.zrange(registry.key, 0, -1)
                if as_text(m).split(":", 1)[0] == job_id
            ]
            if stale:
                self.redis.zrem(registry.key, *stale)

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
