"""Backpressure, idempotency, API keys and readiness."""

from __future__ import annotations

import threading
import warnings

import httpx
import openai
import pytest
from rq import Queue

from contract.enqueue import queue_name
from contract.speed import Shape, SpeedModel
from contract.store import JobStore

# The RQ queue the tiny model's jobs go to (QUEUE_NAME "vmoba").
TINY_QUEUE = queue_name("vmoba", "tiny-wan2.1-t2v")


def test_queue_full_is_429_before_enqueueing(make_server, redis_client):
    server = make_server(MAX_QUEUE_DEPTH=3, RETRY_AFTER_S=7)
    with httpx.Client(base_url=server.url) as http:
        ids = [http.post("/generate", json={"prompt": f"p{i}"}).json()["id"] for i in range(3)]
        r = http.post("/generate", json={"prompt": "one too many"})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full")
        assert "3 jobs waiting" in err["message"]
        r = http.post("/v1/videos", data={"prompt": "also refused"})
        assert r.status_code == 429
        assert Queue(TINY_QUEUE, connection=redis_client).job_ids == ids
        assert http.get("/jobs").json()["data"].__len__() == 3
        # A slot frees up when a job starts.
        JobStore(redis_client).mark_started(ids[0], worker="w")
        assert http.post("/generate", json={"prompt": "now it fits"}).status_code == 202


def test_concurrent_submissions_never_exceed_the_limit(make_server, redis_client):
    server = make_server(MAX_QUEUE_DEPTH=10)
    codes = []

    def client():
        with httpx.Client(base_url=server.url) as http:
            for _ in range(5):
                codes.append(http.post("/generate", json={"prompt": "race"}).status_code)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(202) == 10 and codes.count(429) == 20
    assert len(Queue(TINY_QUEUE, connection=redis_client)) == 10


def test_idempotent_retries_give_one_job(server, http, redis_client):
    body = {"prompt": "retry me", "num_frames": 9}
    headers = {"Idempotency-Key": "abc-123"}
    first = http.post("/generate", json=body, headers=headers)
    again = http.post("/generate", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert first.json()["seed"] == again.json()["seed"], "the resolved seed is kept"
    assert len(Queue(TINY_QUEUE, connection=redis_client)) == 1

    other = http.post("/generate", json={"prompt": "different"}, headers=headers)
    assert other.status_code == 409 and "different request" in other.json()["error"]["message"]

    # Many concurrent retries of one request still make one job.
    ids = []

    def retry():
        r = httpx.post(
            f"{server.url}/generate", json={"prompt": "storm"}, headers={"Idempotency-Key": "storm"}
        )
        ids.append(r.json()["id"])

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(Queue(TINY_QUEUE, connection=redis_client)) == 2

    # Through the OpenAI client (which may retry POSTs itself).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        a = client.videos.create(prompt="oa", extra_headers={"Idempotency-Key": "oa-1"})
        b = client.videos.create(prompt="oa", extra_headers={"Idempotency-Key": "oa-1"})
    assert a.id == b.id


def test_api_keys(make_server):
    server = make_server(API_KEYS="key-one, key-two")
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/generate", json={"prompt": "p"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert "Authorization: Bearer" in r.json()["error"]["message"]
        bad = http.get("/jobs", headers={"Authorization": "Bearer key-three"})
        assert bad.status_code == 401 and bad.json()["error"]["message"] == "invalid API key"
        assert http.get("/jobs", headers={"Authorization": "Basic key-one"}).status_code == 401
        assert http.get("/metrics").status_code == 401
        for key in ("key-one", "key-two"):
            r = http.post(
                "/generate", json={"prompt": "p"}, headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 202
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 503, "open, and not ready without a worker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-two", max_retries=0)
        assert good.videos.create(prompt="with a key").status == "queued"
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.videos.list()


def test_idempotency_keys_are_scoped_by_api_key(make_server):
    server = make_server(API_KEYS="alice,bob")
    with httpx.Client(base_url=server.url) as http:
        ids = [
            http.post(
                "/generate",
                json={"prompt": "same"},
                headers={"Authorization": f"Bearer {k}", "Idempotency-Key": "k"},
            ).json()["id"]
            for k in ("alice", "bob")
        ]
    assert ids[0] != ids[1]


def test_readyz_follows_worker_heartbeats(http, store):
    r = http.get("/readyz")
    assert r.status_code == 503 and "no live worker" in r.json()["reason"]
    store.heartbeat(
        "gpu-7", {"queue": "vmoba", "device": "cuda:0", "models": ["tiny-wan2.1-t2v"]}, ttl_s=1
    )
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["worker_names"] == ["gpu-7"]
    assert http.get("/models").json()["data"][0]["workers"][0]["device"] == "cuda:0"
    import time

    time.sleep(1.2)
    assert http.get("/readyz").status_code == 503
    assert http.get("/healthz").json() == {"status": "ok"}


def test_redis_down_is_503_not_500(make_server):
    server = make_server(REDIS_URL="redis://127.0.0.1:1/0")
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/generate", json={"prompt": "p"})
        assert r.status_code == 503 and "Redis" in r.json()["error"]["message"]
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200


def _speed(s_per_unit: float, samples: int = 1) -> dict:
    """A heartbeat's speed as a worker publishes it (`SpeedModel.to_dict`)."""
    return SpeedModel(
        s_per_unit=s_per_unit, s_per_mpx=1.0, fixed_s=2.0, ref_tokens=1024, samples=samples
    ).to_dict()


def test_requests_longer_than_max_job_s_are_refused_with_the_estimate(make_server, redis_client):
    store = JobStore(redis_client)
    model = "tiny-wan2.1-t2v"
    store.heartbeat("slow", {"models": [model], "speed": _speed(1e-1)}, ttl_s=30)
    store.heartbeat("fast", {"models": [model], "speed": _speed(1e-4)}, ttl_s=30)
    store.heartbeat("unmeasured", {"models": [model], "speed": _speed(1e-6, samples=0)}, ttl_s=30)
    store.heartbeat("other-model", {"models": ["tiny-wan2.2-ti2v"], "speed": _speed(1e-9)})
    big = {
        "prompt": "long",
        "num_frames": 33,
        "width": 256,
        "height": 256,
        "num_inference_steps": 40,
        "guidance_scale": 5.0,
    }
    shape = Shape(33, 256, 256, 40, 5.0)
    fastest = SpeedModel.from_dict(_speed(1e-4))
    assert fastest is not None
    estimate = fastest.lower_bound_s(shape)
    server = make_server(MAX_JOB_S=estimate * 0.9)
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/generate", json=big)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "job_too_long"
        assert f"at least {estimate:.0f} s" in err["message"] and "MAX_JOB_S" in err["message"]
        assert http.get("/jobs").json()["data"] == []  # nothing was created
        small = {**big, "num_frames": 5, "num_inference_steps": 2}
        assert http.post("/generate", json=small).status_code == 202
    # On the slow worker alone the small job is too long as well; with no measured worker at all,
    # requests are admitted (the worker's own timeout still bounds them).
    store.drop_worker("fast")
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/generate", json=small).json()["error"]["code"] == "job_too_long"
        store.drop_worker("slow")
        assert http.post("/generate", json=big).status_code == 202
    # 0 turns the check off.
    store.heartbeat("slow", {"models": [model], "speed": _speed(1e-1)}, ttl_s=30)
    off = make_server(MAX_JOB_S=0)
    with httpx.Client(base_url=off.url) as http:
        assert http.post("/generate", json=big).status_code == 202


def test_speed_round_trips_through_a_heartbeat():
    measured = SpeedModel.prior("cpu")
    measured.observe(Shape(5, 64, 64, 2, 5.0), denoise_s=1.5, decode_encode_s=0.2, fixed_s=0.3)
    assert SpeedModel.from_dict(measured.to_dict()) == measured
    # Admission's bound never exceeds the timeout's estimate; they agree up to the measured size.
    small, big = Shape(5, 32, 32, 2, 5.0), Shape(33, 512, 512, 20, 5.0)
    measured.ref_tokens = small.tokens
    assert measured.lower_bound_s(small) == measured.estimate_s(small)
    assert measured.lower_bound_s(big) < measured.estimate_s(big)
    assert SpeedModel.from_dict(SpeedModel.prior("cpu").to_dict()) is None  # not measured yet
    for bad in (None, "fast", {"s_per_unit": 1}, {**measured.to_dict(), "fixed_s": "x"}):
        assert SpeedModel.from_dict(bad) is None
