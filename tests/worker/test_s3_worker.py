"""Workers writing results to S3-compatible object storage (moto's standalone server over HTTP):
a real RQ worker in this process with the tiny model, the janitor's retention, and storage that
goes down while a job publishes."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from worker_helpers import configure, run_worker, submit, wait_for, worker_env

from contract.files import META_FILE, RESULT_FILES, VIDEO_FILE
from contract.keys import new_job_id
from contract.store import JobStore
from worker import jobs
from worker.janitor import Janitor
from worker.run import Heartbeat
from worker.settings import WorkerSettings
from worker.storage import open_storage


def use_s3(rt, url: str, **settings):
    configure(rt, STORAGE_URL=url, **settings)
    rt.storage = open_storage(rt.settings)
    return rt.storage


def staged_dirs(storage, job_id: str) -> list:
    if not storage.staging_dir.is_dir():
        return []
    return sorted(storage.staging_dir.glob(f"{job_id}.*"))


def publishing(store, storage, job_id: str) -> bool:
    """The job is at its last step: encoded, sidecar written, files being published."""
    rec = store.get(job_id)
    staged = staged_dirs(storage, job_id)
    return bool(rec and rec.stage == "encoding" and staged and (staged[0] / META_FILE).exists())


@pytest.fixture
def fast_retries(monkeypatch):
    """Publish retries at most 1 s apart, so a test sees several within seconds."""
    monkeypatch.setattr(jobs, "PUBLISH_MAX_BACKOFF_S", 1.0)


def test_a_job_publishes_its_files_under_the_job_prefix(rt, redis_client, s3):
    storage = use_s3(rt, s3.url)
    job_id = submit(redis_client, num_frames=5, num_inference_steps=2)
    run_worker(rt)
    rec = JobStore(redis_client).get(job_id)
    assert rec.status == "completed", rec.error_message
    assert rec.files == list(RESULT_FILES) and rec.timings["upload_s"] >= 0
    assert s3.keys() == sorted(f"{s3.prefix}/jobs/{job_id}/{name}" for name in RESULT_FILES)
    meta = json.loads(storage.open(job_id, META_FILE).read(1 << 20))
    assert meta["id"] == job_id
    assert meta["video"]["size_bytes"] == storage.stat(job_id, VIDEO_FILE).size
    assert storage.open(job_id, VIDEO_FILE, 4, 8).read(4) == b"ftyp"  # an mp4
    assert not (rt.settings.DATA_DIR / "jobs").exists()  # nothing published on local disk
    assert os.listdir(storage.staging_dir) == []


def test_janitor_removes_expired_and_stray_objects(redis_url, redis_client, s3, tmp_path):
    settings = WorkerSettings(
        **worker_env(
            redis_url,
            tmp_path / "data",
            STORAGE_URL=s3.url,
            RETENTION_S=3600,
            STAGING_MAX_AGE_S=0.5,
        )
    )
    store = JobStore(redis_client, retention_s=settings.RETENTION_S)
    storage = open_storage(settings)
    janitor = Janitor(redis_client, store, storage, settings)

    def publish(job_id):
        with storage.stage(job_id) as staged:
            staged.file(VIDEO_FILE).write_bytes(os.urandom(1000))
            staged.write_json(META_FILE, {})
            staged.publish()

    done, running, stray = submit(redis_client), submit(redis_client), new_job_id()
    for job_id in (done, running):
        assert store.mark_started(job_id, worker="w")
        publish(job_id)
    assert store.mark_completed(done, files=[VIDEO_FILE, META_FILE])
    publish(stray)  # files of a job whose record is gone (deleted while it was publishing)
    store.heartbeat("w", {}, ttl_s=30)
    time.sleep(1.2)  # older than STAGING_MAX_AGE_S (object times have a one-second resolution)

    report = janitor.sweep()
    assert report.stray_dirs == [stray] and report.expired == []
    assert s3.job_keys(stray) == [] and s3.job_keys(done) == [META_FILE, VIDEO_FILE]
    report = janitor.sweep(now=time.time() + 3600 + 5)
    assert report.expired == [done] and store.get(done) is None
    assert s3.job_keys(done) == []  # every object under the job's prefix
    assert s3.job_keys(running) == [META_FILE, VIDEO_FILE]


def test_retention_waits_while_storage_is_down(
    redis_url, redis_client, make_moto, make_s3, tmp_path
):
    server = make_moto()
    s3 = make_s3(server)
    settings = WorkerSettings(**worker_env(redis_url, tmp_path / "data", STORAGE_URL=s3.url))
    store = JobStore(redis_client, retention_s=settings.RETENTION_S)
    storage = open_storage(settings)
    janitor = Janitor(redis_client, store, storage, settings)
    job_id = submit(redis_client)
    store.mark_started(job_id, worker="w")
    with storage.stage(job_id) as staged:
        staged.write_json(META_FILE, {})
        staged.publish()
    store.mark_completed(job_id, files=[META_FILE])
    later = time.time() + settings.RETENTION_S + 5

    server.stop()
    report = janitor.sweep(now=later)  # no crash, and the record stays: its files are not gone
    assert report is not None and report.expired == [] and store.get(job_id) is not None
    server.start()
    server.make_bucket(s3.bucket)
    assert janitor.sweep(now=later).expired == [job_id] and store.get(job_id) is None


def test_storage_down_the_job_waits_in_progress_and_completes_when_it_is_back(
    rt, redis_client, make_moto, make_s3, fast_retries
):
    server = make_moto()
    s3 = make_s3(server)
    storage = use_s3(rt, s3.url, STORAGE_RETRY_S=60)
    store = JobStore(redis_client)
    janitor = Janitor(redis_client, store, storage, rt.settings)
    job_id = submit(redis_client)
    server.stop()  # storage goes down before the worker publishes
    seen = {}

    def watch_then_bring_storage_back():
        wait_for(lambda: publishing(store, storage, job_id), timeout_s=60, what="publishing")
        time.sleep(2.5)  # several failed attempts
        rec = store.get(job_id)
        seen["record"] = (rec.status, rec.stage)
        seen["alive"] = store.worker_alive(rec.worker)
        seen["sweep"] = janitor.sweep()
        seen["staged"] = sorted(os.listdir(staged_dirs(storage, job_id)[0]))
        seen["watchdog_s"] = rt.current.deadline - time.monotonic()
        server.start()
        server.make_bucket(s3.bucket)  # moto forgets everything when it stops

    heartbeat = Heartbeat(rt)
    heartbeat.start()
    thread = threading.Thread(target=watch_then_bring_storage_back)
    thread.start()
    try:
        run_worker(rt)
    finally:
        thread.join()
        heartbeat.stop()
    # While storage was down: still in progress, its worker alive, its files kept, and the
    # janitor left it alone; the watchdog will not kill a worker waiting for storage.
    assert seen["record"] == ("in_progress", "encoding")
    assert seen["alive"] and not seen["sweep"].lost and not seen["sweep"].requeued
    assert seen["staged"] == sorted(RESULT_FILES)
    assert seen["watchdog_s"] > 55
    rec = store.get(job_id)
    assert rec.status == "completed", rec.error_message
    assert s3.job_keys(job_id) == sorted(RESULT_FILES)
    assert os.listdir(storage.staging_dir) == []


def test_storage_down_past_the_retry_window_fails_with_storage_unavailable(
    rt, redis_client, make_moto, make_s3, fast_retries
):
    server = make_moto()
    storage = use_s3(rt, make_s3(server).url, STORAGE_RETRY_S=2)
    server.stop()
    job_id = submit(redis_client)
    t0 = time.monotonic()
    run_worker(rt)
    rec = JobStore(redis_client).get(job_id)
    assert (rec.status, rec.error_code) == ("failed", "storage_unavailable")
    assert "STORAGE_RETRY_S=2" in rec.error_message and "Could not connect" in rec.error_message
    assert time.monotonic() - t0 < 30
    assert os.listdir(storage.staging_dir) == []  # a failed job keeps nothing


def test_a_cancel_ends_a_job_waiting_for_storage(
    rt, redis_client, make_moto, make_s3, fast_retries
):
    server = make_moto()
    storage = use_s3(rt, make_s3(server).url, STORAGE_RETRY_S=60)
    server.stop()
    store = JobStore(redis_client)
    job_id = submit(redis_client)

    def cancel_while_publishing():
        wait_for(lambda: publishing(store, storage, job_id), timeout_s=60, what="publishing")
        store.request_cancel(job_id)

    thread = threading.Thread(target=cancel_while_publishing)
    thread.start()
    t0 = time.monotonic()
    run_worker(rt)
    thread.join()
    assert store.get(job_id).status == "cancelled" and time.monotonic() - t0 < 30
    assert os.listdir(storage.staging_dir) == []
