"""The janitor against real Redis and real RQ state: dead workers' jobs, orphans, retention,
leftover files. Dead workers are made the way they look after `kill -9`: RQ's execution is
started under their name, our record is in progress, and no heartbeat exists."""

from __future__ import annotations

import os
import time

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from worker_helpers import submit, worker_env

from contract.enqueue import queue_name
from contract.files import VIDEO_FILE
from contract.keys import JANITOR_LOCK_KEY as LOCK_KEY
from contract.keys import new_job_id
from contract.store import JobStore
from worker.janitor import ORPHAN_REQUEUES, Janitor
from worker.settings import WorkerSettings
from worker.storage import ResultStorage

# The RQ queue the tiny model's jobs go to (QUEUE_NAME "vmoba").
TINY_QUEUE = queue_name("vmoba", "tiny-wan2.1-t2v")


@pytest.fixture
def env(redis_url, redis_client, tmp_path):
    def make(**extra):
        settings = WorkerSettings(**worker_env(redis_url, tmp_path / "data", **extra))
        store = JobStore(redis_client, retention_s=settings.RETENTION_S)
        storage = ResultStorage(settings.DATA_DIR)
        return Janitor(redis_client, store, storage, settings), store, storage

    return make


def taking(redis_client, job_id, worker_name):
    """RQ's first steps of a worker taking the job: off its queue, then (one transaction) its
    execution and the started registry entry. The job does not name the worker yet: RQ's next
    transaction, `worker.prepare_job_execution(job)`, does. Returns (worker, job)."""
    queue = Queue(TINY_QUEUE, connection=redis_client)
    job = Job.fetch(job_id, connection=redis_client)
    queue.remove(job)
    worker = SimpleWorker([queue], connection=redis_client, name=worker_name)
    worker.prepare_execution(job)
    return worker, job


def start_in_rq(redis_client, job_id, worker_name):
    """RQ's side of a worker taking the job: an execution and the started registry entry."""
    worker, job = taking(redis_client, job_id, worker_name)
    worker.prepare_job_execution(job)
    return job


def publish_files(storage, job_id):
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(os.urandom(64))
        staged.publish()


def running_on(redis_client, store, storage, worker):
    job_id = submit(redis_client)
    start_in_rq(redis_client, job_id, worker)
    assert store.mark_started(job_id, worker=worker)
    publish_files(storage, job_id)  # e.g. killed between publishing and marking completed
    return job_id


def test_job_of_a_dead_worker_fails_with_worker_lost(env, redis_client):
    janitor, store, storage = env(LOST_JOB_RETRIES=0)
    store.heartbeat("alive", {"queue": "vmoba"}, ttl_s=30)
    dead = running_on(redis_client, store, storage, "ghost")
    live = running_on(redis_client, store, storage, "alive")
    report = janitor.sweep()
    assert report.lost == [dead] and report.requeued == []
    rec = store.get(dead)
    assert (rec.status, rec.error_code) == ("failed", "worker_lost")
    assert "ghost" in rec.error_message and "not retried" in rec.error_message
    assert not storage.job_dir(dead).exists()  # no half-finished result stays behind
    job = Job.fetch(dead, connection=redis_client)
    assert job.get_status() == JobStatus.FAILED
    assert dead in FailedJobRegistry(queue=Queue(TINY_QUEUE, connection=redis_client))
    started = StartedJobRegistry(queue=Queue(TINY_QUEUE, connection=redis_client))
    assert [j for j, _ in started.get_job_and_execution_ids(cleanup=False)] == [live]
    assert store.get(live).status == "in_progress" and storage.job_dir(live).exists()


def test_job_of_a_dead_worker_is_retried_once_by_setting(env, redis_client):
    janitor, store, storage = env(LOST_JOB_RETRIES=1)
    queue = Queue(TINY_QUEUE, connection=redis_client)
    waiting = submit(redis_client)
    job_id = running_on(redis_client, store, storage, "ghost-1")
    assert janitor.sweep().requeued == [job_id]
    rec = store.get(job_id)
    assert (rec.status, rec.worker, rec.attempts) == ("queued", None, 1)
    assert queue.job_ids == [job_id, waiting]  # back at the front
    assert Job.fetch(job_id, connection=redis_client).get_status() == JobStatus.QUEUED
    assert StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False) == []

    # The second worker dies too: no more retries.
    start_in_rq(redis_client, job_id, "ghost-2")
    assert store.mark_started(job_id, worker="ghost-2")
    assert janitor.sweep().lost == [job_id]
    rec = store.get(job_id)
    assert (rec.status, rec.error_code, rec.attempts) == ("failed", "worker_lost", 2)
    assert "already retried 1 time" in rec.error_message


def test_death_before_the_record_said_started_requeues(env, redis_client):
    janitor, store, _ = env(LOST_JOB_RETRIES=0)
    job_id = submit(redis_client)
    start_in_rq(redis_client, job_id, "ghost")  # RQ took it; our record is still queued
    assert janitor.sweep().requeued == [job_id]
    assert store.get(job_id).status == "queued"
    assert Queue(TINY_QUEUE, connection=redis_client).job_ids == [job_id]


def test_a_job_a_live_worker_is_taking_is_left_alone(env, redis_client):
    """A sweep between RQ registering a start and the job naming its worker: the job names no
    worker (a first run) or its last one (re-queued after its worker died), our record is still
    queued. The worker RQ's execution names is alive: neither job is re-queued nor failed."""
    janitor, store, _ = env(LOST_JOB_RETRIES=0)
    queue = Queue(TINY_QUEUE, connection=redis_client)
    rerun = submit(redis_client)
    start_in_rq(redis_client, rerun, "ghost")
    assert janitor.sweep().requeued == [rerun]  # its first worker died before it started
    fresh = submit(redis_client)
    for name in ("live-1", "live-2"):
        store.heartbeat(name, {"queue": "vmoba"}, ttl_s=30)
    taken = [taking(redis_client, fresh, "live-1"), taking(redis_client, rerun, "live-2")]
    assert Job.fetch(fresh, connection=redis_client).worker_name is None
    assert Job.fetch(rerun, connection=redis_client).worker_name == "ghost"
    report = janitor.sweep(now=time.time() + 120)  # the records are old enough to be orphans
    assert not report, report
    assert janitor.reap_worker("ghost").requeued == []
    assert all(store.get(j).status == "queued" for j in (fresh, rerun))
    assert queue.job_ids == []
    started = StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False)
    assert sorted(j for j, _ in started) == sorted([fresh, rerun])
    for job_id, (worker, job) in zip((fresh, rerun), taken):
        assert job.get_status() == JobStatus.QUEUED  # RQ did not fail it either
        worker.prepare_job_execution(job)
        assert store.mark_started(job_id, worker=worker.name)
    assert not janitor.sweep(now=time.time() + 120)


def test_a_worker_that_dies_taking_a_job_loses_it(env, redis_client):
    """The same moment, but the worker RQ's execution names is dead: the job goes back to its
    queue, from the sweep or at once from `reap_worker`, even when the job still names the
    worker of an earlier run."""
    janitor, store, _ = env(LOST_JOB_RETRIES=0)
    queue = Queue(TINY_QUEUE, connection=redis_client)
    first, second = submit(redis_client), submit(redis_client)
    taking(redis_client, first, "ghost")
    assert janitor.sweep().requeued == [first]
    assert queue.job_ids == [first, second]
    store.heartbeat("gone", {"queue": "vmoba"}, ttl_s=30)  # not expired yet
    store.heartbeat("other", {"queue": "vmoba"}, ttl_s=30)
    start_in_rq(redis_client, second, "other")
    taking(redis_client, first, "gone")  # the job still names "ghost"
    assert janitor.reap_worker("gone", reason="signal SIGKILL").requeued == [first]
    assert queue.job_ids == [first] and store.get(first).status == "queued"
    started = StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False)
    assert [j for j, _ in started] == [second]


def test_a_job_popped_by_a_worker_is_not_an_orphan_until_it_stays_lost(env, redis_client):
    """A worker of several queues pops a job (LPOP) before registering its start: RQ says
    queued and no queue holds it. A job still so `HEARTBEAT_TTL_S` later (its worker died right
    after the pop) is enqueued again; one that a worker registered is left to it."""
    janitor, store, _ = env()
    queue = Queue(TINY_QUEUE, connection=redis_client)
    popped, lost = submit(redis_client), submit(redis_client)
    queue.remove(popped)
    queue.remove(lost)
    t = time.time() + 120  # past ORPHAN_GRACE_S
    assert janitor.sweep(now=t).requeued == []
    worker = SimpleWorker([queue], connection=redis_client, name="live")
    store.heartbeat("live", {"queue": "vmoba"}, ttl_s=30)
    job = Job.fetch(popped, connection=redis_client)
    worker.prepare_execution(job)  # registered; the job says queued until the next step
    ttl = janitor.settings.HEARTBEAT_TTL_S
    assert janitor.sweep(now=t + ttl / 2).requeued == []
    assert janitor.sweep(now=t + ttl).requeued == [lost]
    assert queue.job_ids == [lost] and store.get(popped).status == "queued"
    worker.prepare_job_execution(job)
    assert janitor.sweep(now=t + 2 * ttl).requeued == []


def test_reap_worker_handles_only_that_worker(env, redis_client):
    janitor, store, storage = env(LOST_JOB_RETRIES=0)
    mine = running_on(redis_client, store, storage, "gone")
    other = running_on(redis_client, store, storage, "other-dead")
    store.heartbeat("gone", {}, ttl_s=30)  # its heartbeat has not expired yet
    report = janitor.reap_worker("gone", reason="signal SIGKILL")
    assert report.lost == [mine] and not store.worker_alive("gone")
    assert "SIGKILL" in store.get(mine).error_message
    assert store.get(other).status == "in_progress"


def test_orphaned_queued_jobs_are_enqueued_again_then_end(env, redis_client):
    """A waiting record whose RQ job is not waiting (Redis lost the enqueue, RQ failed it) is
    enqueued again from the record, a few times at most; one RQ cancelled ends cancelled."""
    janitor, store, _ = env()
    queue = Queue(TINY_QUEUE, connection=redis_client)
    gone = submit(redis_client)
    Job.fetch(gone, connection=redis_client).delete()
    cancelled = submit(redis_client)
    Job.fetch(cancelled, connection=redis_client).cancel()
    dropped = submit(redis_client)
    queue.remove(dropped)  # RQ's job says queued, but no queue holds it
    waiting = submit(redis_client)
    fresh_gone = submit(redis_client)
    assert janitor.sweep().orphaned == []  # young records may still be on their way into RQ
    Job.fetch(fresh_gone, connection=redis_client).delete()
    t = time.time() + 120
    report = janitor.sweep(now=t)
    assert sorted(report.requeued) == sorted([gone, fresh_gone])
    assert report.orphaned == [cancelled] and store.get(cancelled).status == "cancelled"
    # Popped by a worker about to register it, or lost: lost once it stays so.
    assert janitor.sweep(now=t + janitor.settings.HEARTBEAT_TTL_S).requeued == [dropped]
    assert sorted(queue.job_ids) == sorted([gone, dropped, fresh_gone, waiting])
    assert Job.fetch(gone, connection=redis_client).args[0]["job_id"] == gone
    assert all(store.get(j).status == "queued" for j in (gone, dropped, fresh_gone, waiting))

    # A job that keeps getting lost before it starts ends after ORPHAN_REQUEUES tries.
    for _ in range(ORPHAN_REQUEUES - 1):
        Job.fetch(gone, connection=redis_client).delete()
        assert janitor.sweep(now=time.time() + 120).requeued == [gone]
    Job.fetch(gone, connection=redis_client).delete()
    assert janitor.sweep(now=time.time() + 120).orphaned == [gone]
    rec = store.get(gone)
    assert (rec.status, rec.error_code) == ("failed", "worker_lost")
    assert "lost this job" in rec.error_message


def test_expired_results_and_records_are_removed(env, redis_client):
    janitor, store, storage = env(RETENTION_S=3600)
    ids = []
    for _ in range(3):
        job_id = submit(redis_client)
        store.mark_started(job_id, worker="w")
        publish_files(storage, job_id)
        store.mark_completed(job_id, files=[VIDEO_FILE])
        ids.append(job_id)
    failed = submit(redis_client)
    store.mark_failed(failed, "internal_error", "boom")
    janitor.store.heartbeat("w", {}, ttl_s=30)
    assert janitor.sweep().expired == []
    report = janitor.sweep(now=time.time() + 3600 + 5)
    assert sorted(report.expired) == sorted(ids + [failed])
    for job_id in ids + [failed]:
        assert store.get(job_id) is None
        assert not storage.job_dir(job_id).exists()
        assert not Job.exists(job_id, connection=redis_client)
    assert store.list()[0] == []


def test_leftover_staging_and_stray_directories(env, redis_client):
    janitor, store, storage = env(STAGING_MAX_AGE_S=600)
    old_stage = storage.stage(new_job_id()).path
    new_stage = storage.stage(new_job_id()).path
    stray, kept = new_job_id(), submit(redis_client)
    publish_files(storage, stray)
    publish_files(storage, kept)
    past = time.time() - 3600
    for path in (old_stage, storage.job_dir(stray), storage.job_dir(kept)):
        os.utime(path, (past, past))
    report = janitor.sweep()
    assert report.staging == [old_stage.name] and report.stray_dirs == [stray]
    assert new_stage.exists() and storage.job_dir(kept).exists()


def test_one_sweep_at_a_time(env, redis_client):
    janitor, _, _ = env()
    redis_client.set(LOCK_KEY, "someone", ex=30)
    assert janitor.sweep() is None
    redis_client.delete(LOCK_KEY)
    assert janitor.sweep() is not None
    assert not redis_client.exists(LOCK_KEY)


def publish_result(storage, job_id, **meta):
    """A complete result as a worker publishes it: the video, a thumbnail and the sidecar."""
    sidecar = {
        "id": job_id,
        "created_at": time.time(),
        "request": {"prompt": "p", "num_inference_steps": 2, "model": "tiny-wan2.1-t2v"},
        "seed": 3,
        "timings": {"denoising_s": 1.5, "total_s": 2.0},
        "density": 0.4,
        "attention": {"backend": "vmoba"},
        "attention_sources": {"backend": "request"},
        "video": {"file": "video.mp4"},
        "thumbnail": {"file": "thumbnail.jpg"},
        "worker": {"attempt": 1},
        **meta,
    }
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(os.urandom(64))
        staged.file("thumbnail.jpg").write_bytes(os.urandom(16))
        staged.write_json("meta.json", sidecar)
        staged.publish()


def test_a_lost_job_whose_result_is_stored_is_completed_not_deleted(env, redis_client):
    """Killed between publishing the result and marking the record: the video stays and the
    job is completed from its sidecar, whatever LOST_JOB_RETRIES says."""
    janitor, store, storage = env(LOST_JOB_RETRIES=0)
    job_id = submit(redis_client)
    start_in_rq(redis_client, job_id, "ghost")
    assert store.mark_started(job_id, worker="ghost")
    publish_result(storage, job_id)
    report = janitor.reap_worker("ghost", reason="signal SIGKILL")
    assert report.recovered == [job_id] and report.lost == []
    rec = store.get(job_id)
    assert (rec.status, rec.density, rec.timings["denoising_s"]) == ("completed", 0.4, 1.5)
    assert rec.attention["sources"] == {"backend": "request"} and "meta.json" in rec.files
    assert storage.finished_result(job_id) is not None  # the video was kept
    assert not Job.exists(job_id, connection=redis_client)
    queue = Queue(TINY_QUEUE, connection=redis_client)
    assert StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False) == []


def test_a_lost_job_with_a_cancel_request_ends_cancelled(env, redis_client):
    janitor, store, storage = env(LOST_JOB_RETRIES=1)
    job_id = running_on(redis_client, store, storage, "ghost")  # a video, no sidecar: partial
    store.request_cancel(job_id)
    report = janitor.reap_worker("ghost", reason="signal SIGKILL")
    assert report.cancelled == [job_id] and report.requeued == []
    rec = store.get(job_id)
    assert (rec.status, rec.error_code) == ("cancelled", "cancelled")
    assert "SIGKILL" in rec.error_message and not storage.job_dir(job_id).exists()


def test_graceful_requeues_do_not_count_as_lost(env, redis_client):
    """SIGTERM re-queues (the record's attempts go up) leave LOST_JOB_RETRIES untouched."""
    janitor, store, storage = env(LOST_JOB_RETRIES=1)
    job_id = submit(redis_client)
    for worker in ("stopped-1", "stopped-2"):
        assert store.mark_started(job_id, worker=worker)
        assert store.mark_requeued(job_id, reason="worker shutting down")
    start_in_rq(redis_client, job_id, "ghost-1")
    assert store.mark_started(job_id, worker="ghost-1")
    assert janitor.reap_worker("ghost-1").requeued == [job_id]
    rec = store.get(job_id)
    assert (rec.status, rec.attempts, rec.lost) == ("queued", 3, 1)
    start_in_rq(redis_client, job_id, "ghost-2")
    assert store.mark_started(job_id, worker="ghost-2")
    assert janitor.reap_worker("ghost-2").lost == [job_id]
    rec = store.get(job_id)
    assert (rec.status, rec.attempts) == ("failed", 4)
    assert "already retried 1 time" in rec.error_message


def test_a_job_its_live_worker_does_not_run_is_lost(env, redis_client):
    """The record says in progress on a live worker whose heartbeat, written well after the job
    started, names no job (e.g. Redis lost an update in a restart)."""
    janitor, store, storage = env(LOST_JOB_RETRIES=1)
    job_id = submit(redis_client)
    start_in_rq(redis_client, job_id, "busy-elsewhere")
    assert store.mark_started(job_id, worker="busy-elsewhere")
    store.heartbeat("busy-elsewhere", {"queue": "vmoba", "job_id": None}, ttl_s=30)
    assert janitor.sweep().requeued == []  # the heartbeat may predate the job's start
    store.update(job_id, started_at=time.time() - 60)
    assert janitor.sweep().requeued == [job_id]
    assert store.get(job_id).status == "queued"

    assert store.mark_started(job_id, worker="busy-elsewhere")
    store.update(job_id, started_at=time.time() - 60)
    store.heartbeat("busy-elsewhere", {"queue": "vmoba", "job_id": job_id}, ttl_s=30)
    assert janitor.sweep().requeued == []  # running it: left alone


def test_start_up_completes_waiting_records_whose_result_is_stored(env, redis_client):
    janitor, store, storage = env()
    job_id = submit(redis_client)
    publish_result(storage, job_id)
    other = submit(redis_client)
    assert janitor.sweep().recovered == [job_id]
    assert store.get(job_id).status == "completed" and store.get(other).status == "queued"
    assert Queue(TINY_QUEUE, connection=redis_client).job_ids == [other]


def test_a_finished_job_whose_record_was_lost_is_put_back(env, redis_client):
    from contract.keys import owner_id

    janitor, store, storage = env(RETENTION_S=3600, STAGING_MAX_AGE_S=600)
    kept, expired = new_job_id(), new_job_id()
    submitted = time.time() - 30
    publish_result(storage, kept, owner=owner_id("key-a"), submitted_at=submitted)
    publish_result(storage, expired, created_at=time.time() - 7200)
    past = time.time() - 3600
    os.utime(storage.job_dir(expired), (past, past))
    report = janitor.sweep()
    assert report.recovered == [kept] and report.stray_dirs == [expired]
    rec = store.get(kept)
    assert (rec.status, rec.owner, rec.seed, rec.model) == (
        "completed",
        owner_id("key-a"),
        3,
        "tiny-wan2.1-t2v",
    )
    assert abs(rec.created_at - submitted) < 1e-3 and rec.expires_at > time.time() + 3000
    assert [r.id for r, _ in store.list(owner=owner_id("key-a"))[0]] == [kept]
    assert storage.finished_result(kept) is not None
    assert not storage.job_dir(expired).exists()
    assert janitor.sweep().recovered == []  # once
