"""Native routes on a real uvicorn + real Redis, the worker played through `JobStore`."""

from __future__ import annotations

import random

import pytest
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus

from contract.enqueue import queue_name

# The RQ queue the tiny model's jobs go to (QUEUE_NAME "vmoba").
TINY_QUEUE = queue_name("vmoba", "tiny-wan2.1-t2v")


def test_generate_enqueues_by_dotted_path(server, http, redis_client):
    seed = random.randint(0, 2**40)
    body = {
        "prompt": "a red fox in snow",
        "seed": seed,
        "num_frames": 9,
        "width": 64,
        "height": 48,
        "attention": {"backend": "dense"},
    }
    r = http.post("/generate", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert (job["status"], job["stage"], job["queue_position"], job["seed"]) == (
        "queued",
        "queued",
        1,
        seed,
    )
    assert job["model"] == "tiny-wan2.1-t2v" and "random-weight" in job["model_note"]
    assert job["request"]["num_inference_steps"] == 4, "the tiny model's default"

    rq_job = Job.fetch(job["id"], connection=redis_client)
    assert rq_job.func_name == "worker.jobs.generate_video"
    (payload,) = rq_job.args
    assert payload["job_id"] == job["id"] and payload["seed"] == seed
    assert {k: payload[k] for k in body if k != "attention"} == {
        k: v for k, v in body.items() if k != "attention"
    }
    assert payload["attention"]["backend"] == "dense"
    assert rq_job.timeout >= 3600, "RQ's timeout is only a generous backstop"
    assert Queue(TINY_QUEUE, connection=redis_client).job_ids == [job["id"]]


def test_seed_is_resolved_when_omitted(http):
    seeds = {http.post("/generate", json={"prompt": "p"}).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3 and all(isinstance(s, int) and s >= 0 for s in seeds)


def test_status_progress_and_download(server, http, store, run_job):
    a = http.post("/generate", json={"prompt": "first"}).json()["id"]
    b = http.post("/generate", json={"prompt": "second"}).json()["id"]
    assert http.get(f"/jobs/{b}").json()["queue_position"] == 2

    store.mark_started(a, worker="w0")
    store.mark_progress(a, 2, 4)
    r = http.get(f"/jobs/{a}")
    assert r.headers["openai-poll-after-ms"] == "50"
    job = r.json()
    assert (
        job["status"],
        job["stage"],
        job["step"],
        job["total_steps"],
        job["progress"],
        job["queue_position"],
        job["worker"],
    ) == ("in_progress", "denoising", 2, 4, 45, None, "w0")
    assert http.get(f"/jobs/{b}").json()["queue_position"] == 1
    assert http.get(f"/jobs/{a}/video").status_code == 409

    video = run_job(server.settings, b)
    job = http.get(f"/jobs/{b}").json()
    assert (job["status"], job["progress"], job["density"]) == ("completed", 100, 0.3)
    assert job["timings"]["denoising_s"] == 0.3 and job["timings"]["queued_s"] >= 0
    assert job["expires_at"] == pytest.approx(job["completed_at"] + 3600, abs=2)
    assert job["urls"]["video"] == f"/jobs/{b}/video"

    r = http.get(f"/jobs/{b}/video")
    assert r.status_code == 200 and r.content == video
    assert r.headers["content-type"] == "video/mp4" and r.headers["accept-ranges"] == "bytes"
    assert http.head(f"/jobs/{b}/video").headers["content-length"] == str(len(video))
    thumb = http.get(f"/jobs/{b}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_range_requests(server, http, run_job):
    job_id = http.post("/generate", json={"prompt": "p"}).json()["id"]
    video = run_job(server.settings, job_id)
    n = len(video)
    for _ in range(10):
        start = random.randrange(n)
        end = random.randrange(start, n)
        r = http.get(f"/jobs/{job_id}/video", headers={"Range": f"bytes={start}-{end}"})
        assert r.status_code == 206
        assert r.content == video[start : end + 1]
        assert r.headers["content-range"] == f"bytes {start}-{end}/{n}"
    r = http.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=-100"})
    assert r.status_code == 206 and r.content == video[-100:]
    r = http.get(f"/jobs/{job_id}/video", headers={"Range": f"bytes={n + 10}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{n}"


def test_list_pages(http):
    ids = [http.post("/generate", json={"prompt": f"p{i}"}).json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = http.get("/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    asc = http.get("/jobs", params={"order": "asc"}).json()
    assert [j["id"] for j in asc["data"]] == ids


def test_cancel_queued_running_and_finished(server, http, store, redis_client, run_job):
    queued = http.post("/generate", json={"prompt": "q"}).json()["id"]
    r = http.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 200
    job = r.json()
    assert (job["status"], job["error"]["code"]) == ("cancelled", "cancelled")
    assert Job.fetch(queued, connection=redis_client).get_status() == RQStatus.CANCELED
    assert queued not in Queue(TINY_QUEUE, connection=redis_client).job_ids
    assert not store.mark_started(queued, worker="w"), "the worker must skip it"
    assert http.post(f"/jobs/{queued}/cancel").status_code == 200, "cancelling twice is fine"
    assert http.get(f"/v1/videos/{queued}").json()["status"] == "failed"

    running = http.post("/generate", json={"prompt": "r"}).json()["id"]
    store.mark_started(running, worker="w")
    r = http.post(f"/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    assert r.json()["status"] == "in_progress" and store.is_cancel_requested(running)
    assert store.mark_cancelled(running)
    assert http.get(f"/jobs/{running}").json()["status"] == "cancelled"

    done = http.post("/generate", json={"prompt": "d"}).json()["id"]
    run_job(server.settings, done)
    r = http.post(f"/jobs/{done}/cancel")
    assert r.status_code == 409 and "completed" in r.json()["error"]["message"]


def test_delete(server, http, store, run_job):
    done = http.post("/generate", json={"prompt": "d"}).json()["id"]
    run_job(server.settings, done)
    assert server.settings.job_dir(done).exists()
    r = http.delete(f"/jobs/{done}")
    assert r.json() == {"id": done, "object": "job.deleted", "deleted": True}
    assert not server.settings.job_dir(done).exists()
    assert http.get(f"/jobs/{done}").status_code == 404
    assert http.delete(f"/jobs/{done}").status_code == 404

    running = http.post("/generate", json={"prompt": "r"}).json()["id"]
    store.mark_started(running, worker="w")
    r = http.delete(f"/jobs/{running}")
    assert r.status_code == 409 and "cancel it first" in r.json()["error"]["message"]

    queued = http.post("/generate", json={"prompt": "q"}).json()["id"]
    assert http.delete(f"/jobs/{queued}").status_code == 200
    assert store.get(queued) is None and not store.mark_started(queued, worker="w")


def test_failed_job_shows_its_error(http, store):
    job_id = http.post("/generate", json={"prompt": "big"}).json()["id"]
    store.mark_started(job_id, worker="w")
    store.mark_failed(job_id, "gpu_oom", "81x720x1280 did not fit in 80 GB")
    job = http.get(f"/jobs/{job_id}").json()
    assert job["error"] == {"code": "gpu_oom", "message": "81x720x1280 did not fit in 80 GB"}
    r = http.get(f"/jobs/{job_id}/video")
    assert r.status_code == 409 and "gpu_oom" in r.json()["error"]["message"]


def test_openapi_documents_both_families(http):
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert "num_frames" in body["schema"]["properties"]
    assert "attention" in body["schema"]["properties"]
    assert "multipart/form-data" in spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    assert {"/jobs/{job_id}/events", "/v1/videos/{video_id}/content", "/metrics"} <= set(
        spec["paths"]
    )
