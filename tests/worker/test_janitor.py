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
from worker.janitor import Janitor
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


def start_in_rq(redis_client, job_id, worker_name):
    """RQ's side of a worker taking the job: an execution and the started registry entry."""
    queue = Queue(TINY_QUEUE, connection=redis_client)
    job = Job.fetch(job_id, connection=redis_client)
    queue.remove(job)
    worker = SimpleWorker([queue], connection=redis_client, name=worker_name)
    worker.prepare_execution(job)
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


def test_reap_worker_handles_only_that_worker(env, redis_client):
    janitor, store, storage = env(LOST_JOB_RETRIES=0)
    mine = running_on(redis_client, store, storage, "gone")
    other = running_on(redis_client, store, storage, "other-dead")
    store.heartbeat("gone", {}, ttl_s=30)  # its heartbeat has not expired yet
    report = janitor.reap_worker("gone", reason="signal SIGKILL")
    assert report.lost == [mine] and not store.worker_alive("gone")
    assert "SIGKILL" in store.get(mine).error_message
    assert store.get(other).status == "in_progress"


def test_orphaned_queued_jobs_end(env, redis_client):
    janitor, store, _ = env()
    gone = submit(redis_client)
    Job.fetch(gone, connection=redis_client).delete()
    cancelled = submit(redis_client)
    Job.fetch(cancelled, connection=redis_client).cancel()
    waiting = submit(redis_client)
    fresh_gone = submit(redis_client)
    assert janitor.sweep().orphaned == []  # young records may still be on their way into RQ
    Job.fetch(fresh_gone, connection=redis_client).delete()
    report = janitor.sweep(now=time.time() + 120)
    assert sorted(report.orphaned) == sorted([gone, cancelled, fresh_gone])
    assert (store.get(gone).status, store.get(gone).error_code) == ("failed", "worker_lost")
    assert "lost this job" in store.get(gone).error_message
    assert store.get(cancelled).status == "cancelled"
    assert store.get(waiting).status == "queued"


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
