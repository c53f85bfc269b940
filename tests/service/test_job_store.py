"""The job store against a real redis-server: transitions, events, listing, workers, metrics."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from contract.keys import events_channel, is_job_id, new_job_id
from contract.store import JobStore


@pytest.fixture
def store(redis_client):
    return JobStore(redis_client, retention_s=120)


def make(store, **kw):
    request = {"prompt": f"p{random.random()}", "num_inference_steps": 4, **kw}
    outcome, job_id, position = store.create(request, model="tiny", seed=random.randint(0, 99))
    assert outcome == "created" and is_job_id(job_id) and position == store.queue_depth()
    return job_id


def test_lifecycle_and_events(store, redis_client):
    job_id = make(store)
    rec = store.get(job_id)
    assert (rec.status, rec.stage, rec.progress, rec.total_steps) == ("queued", "queued", 0, 4)
    assert store.queue_position(job_id) == 1 and store.queue_depth() == 1

    pubsub = redis_client.pubsub()
    pubsub.subscribe(events_channel(job_id))
    pubsub.get_message(timeout=1)  # subscribe confirmation

    assert store.mark_started(job_id, worker="w0")
    assert not store.mark_started(job_id, worker="w1"), "a job starts once"
    for step in range(1, 5):
        assert store.mark_progress(job_id, step, 4)
    assert store.mark_stage(job_id, "decoding") and store.mark_stage(job_id, "encoding")
    assert store.mark_completed(
        job_id, files=["video.mp4"], density=0.2, timings={"denoising_s": 0.4, "total_s": 1.0}
    )
    assert not store.mark_cancelled(job_id), "a completed job stays completed"

    rec = store.get(job_id)
    assert (rec.status, rec.stage, rec.progress, rec.attempts) == ("completed", "done", 100, 1)
    assert rec.files == ["video.mp4"] and rec.density == 0.2 and rec.worker == "w0"
    assert rec.timings["denoising_s"] == 0.4 and "queued_s" in rec.timings
    assert rec.expires_at == pytest.approx(rec.completed_at + 120)
    assert store.queue_position(job_id) is None and store.expired(now=time.time()) == []
    assert store.expired(now=rec.expires_at + 1) == [job_id]

    live = []
    deadline = time.time() + 2
    while time.time() < deadline:
        m = pubsub.get_message(timeout=0.2)
        if m and m["type"] == "message":
            live.append(json.loads(m["data"]))
            if live[-1]["type"] == "completed":
                break
    types = [e["type"] for e in live]
    assert types == [
        "started",
        "progress",
        "progress",
        "progress",
        "progress",
        "stage",
        "stage",
        "completed",
    ]
    assert [e["progress"] for e in live] == [0, 22, 45, 67, 90, 92, 96, 100]
    assert [e["seq"] for e in live] == sorted(e["seq"] for e in live)
    assert store.events_since(job_id, live[3]["seq"]) == live[4:]
    pubsub.close()


def test_cancel_paths(store):
    queued = make(store)
    store.request_cancel(queued)
    assert store.is_cancel_requested(queued)
    assert store.mark_cancelled(queued)
    assert not store.mark_started(queued, worker="w"), "a cancelled job must not start"
    rec = store.get(queued)
    assert rec.status == "cancelled" and rec.error_code == "cancelled"

    running = make(store)
    assert store.mark_started(running, worker="w")
    assert not store.is_cancel_requested(running)
    assert store.mark_failed(running, "gpu_oom", "81x720x1280 needs more memory")
    rec = store.get(running)
    assert (rec.error_code, rec.status) == ("gpu_oom", "failed")
    assert store.running_jobs() == []


def test_requeue_keeps_queue_order(store):
    a, b = make(store), make(store)
    assert store.mark_started(a, worker="w")
    assert store.queue_position(b) == 1
    assert store.mark_requeued(a, reason="SIGTERM")
    assert (store.queue_position(a), store.queue_position(b)) == (1, 2)
    assert store.mark_started(a, worker="w2")
    assert store.get(a).attempts == 2


def test_idempotency_and_capacity(store):
    req = {"prompt": "same", "num_inference_steps": 2}
    first = store.create(req, model="tiny", idempotency_key="k1", max_queued=2)
    again = store.create(req, model="tiny", idempotency_key="k1", max_queued=2)
    assert first.outcome == "created" and again == ("existing", first.job_id, 1)
    other = store.create({"prompt": "other"}, model="tiny", idempotency_key="k1")
    assert other == ("conflict", first.job_id, None)
    assert store.create({"prompt": "b"}, model="tiny", max_queued=2)[0] == "created"
    assert store.create({"prompt": "c"}, model="tiny", max_queued=2) == ("full", "", None)
    assert store.queue_depth() == 2
    # A deleted job frees its idempotency key.
    assert store.delete(first.job_id) and not store.delete(first.job_id)
    assert store.create(req, model="tiny", idempotency_key="k1", max_queued=2)[0] == "created"


def test_list_pages_cover_everything_once(store):
    ids = [make(store) for _ in range(7)]
    seen, after = [], None
    while True:
        page, more = store.list(limit=3, after=after)
        seen += [r.id for r, _ in page]
        if not more:
            break
        after = page[-1][0].id
    assert seen == ids[::-1]
    asc, _ = store.list(limit=10, order="asc")
    assert [r.id for r, _ in asc] == ids
    with pytest.raises(KeyError):
        store.list(after=new_job_id())


def test_heartbeats_expire(store):
    store.heartbeat("gpu0", {"queue": "vmoba", "device": "cuda:0"}, ttl_s=1)
    store.heartbeat("other", {"queue": "elsewhere"}, ttl_s=30)
    assert [w["name"] for w in store.live_workers("vmoba")] == ["gpu0"]
    time.sleep(1.2)
    assert store.live_workers("vmoba") == []
    store.drop_worker("other")
    assert store.live_workers() == []


def test_metrics_count_finished_jobs(store):
    before = store.metrics_snapshot()
    job_id = make(store)
    store.mark_started(job_id, worker="w")
    store.mark_completed(job_id, files=[], timings={"denoising_s": 2.0, "total_s": 3.0})
    after = store.metrics_snapshot()
    assert after["jobs_total"].get("completed", 0) == before["jobs_total"].get("completed", 0) + 1
    assert after["step_seconds"]["count"] == before["step_seconds"]["count"] + 1
    assert after["step_seconds"]["sum"] == pytest.approx(before["step_seconds"]["sum"] + 0.5)
    total = dict(after["stage_seconds"]["total"]["buckets"])
    assert total[2.5] == 0 and total[5] >= 1


def test_concurrent_creates_respect_capacity(store):
    results = []

    def worker():
        for _ in range(10):
            results.append(store.create({"prompt": "x"}, model="tiny", max_queued=25)[0])

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("created") == 25 and results.count("full") == 25
    assert store.queue_depth() == 25


def test_unicode_and_odd_strings_round_trip(store):
    prompt = 'a 🦊 fox — ünïcode "quoted" \\ back\\slash \n newline \u0000 nul 中文'
    outcome, job_id, _ = store.create(
        {"prompt": prompt, "attention": {"topk": [2, 6, 18]}}, model="tiny", seed=2**62
    )
    rec = store.get(job_id)
    assert rec.request["prompt"] == prompt and rec.seed == 2**62
    assert rec.request["attention"] == {"topk": [2, 6, 18]}
    store.mark_started(job_id, worker="wörker 🦊")
    store.mark_failed(job_id, "internal_error", prompt)
    rec = store.get(job_id)
    assert rec.error_message == prompt and rec.worker == "wörker 🦊"
