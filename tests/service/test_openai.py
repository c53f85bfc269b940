"""The OpenAI Videos wire format, driven by the real `openai` client."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from rq.job import Job

# The client marks the Videos API deprecated (OpenAI's service); the wire format is what we serve.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_create_retrieve_list_download_delete(server, client, store, redis_client, run_job):
    video = client.videos.create(prompt="a heron over a lake", seconds="4", size="64x48")
    assert video.status == "queued" and video.id.startswith("video_")
    assert (video.seconds, video.size, video.model, video.progress) == (
        "4",
        "64x48",
        "tiny-wan2.1-t2v",
        0,
    )
    payload = Job.fetch(video.id, connection=redis_client).args[0]
    assert (payload["num_frames"], payload["width"], payload["height"]) == (65, 64, 48)

    got = client.videos.retrieve(video.id)
    assert got.id == video.id and got.prompt == "a heron over a lake"
    assert got.model_extra["queue_position"] == 1 and got.model_extra["seed"] == payload["seed"]

    data = run_job(server.settings, video.id)
    done = client.videos.retrieve(video.id)
    assert done.status == "completed" and done.progress == 100 and done.expires_at
    content = client.videos.download_content(video.id)
    assert content.read() == data
    thumb = client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.read().startswith(b"\xff\xd8")

    others = [client.videos.create(prompt=f"p{i}", seconds="1").id for i in range(3)]
    page = client.videos.list(limit=2)
    assert [v.id for v in page.data] == others[::-1][:2] and page.has_more
    assert [v.id for v in client.videos.list(limit=2)] == others[::-1] + [video.id], (
        "auto-pagination walks every page"
    )

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_create_and_poll(server, client, store):
    created = []
    orig = client.videos.create

    def fake_worker():
        while not created:
            time.sleep(0.01)
        store.mark_started(created[0], worker="w")
        time.sleep(0.1)
        for step in (1, 2):
            store.mark_progress(created[0], step, 2)
        d = server.settings.job_dir(created[0])
        d.mkdir(parents=True)
        (d / "video.mp4").write_bytes(b"mp4")
        store.mark_completed(created[0], files=["video.mp4"])

    def create(**kw):
        v = orig(**kw)
        created.append(v.id)
        return v

    client.videos.create = create
    t = threading.Thread(target=fake_worker)
    t.start()
    start = time.time()
    video = client.videos.create_and_poll(prompt="poll me", seconds="1")
    t.join()
    assert video.status == "completed" and video.id == created[0]
    assert time.time() - start < 5, "the client honours openai-poll-after-ms (50 ms here)"


def test_cancelled_is_failed_with_code(client, http):
    video = client.videos.create(prompt="never mind")
    http.post(f"/jobs/{video.id}/cancel")
    got = client.videos.retrieve(video.id)
    assert got.status == "failed" and got.error.code == "cancelled"


def test_extra_parameters_through_the_client(client, redis_client):
    video = client.videos.create(
        prompt="knobs",
        seconds="2",
        size="96x64",
        extra_body={
            "seed": 42,
            "num_inference_steps": 3,
            "fps": 8,
            "attention": {"backend": "vmoba", "select": "topk", "topk": 3},
        },
    )
    payload = Job.fetch(video.id, connection=redis_client).args[0]
    assert (payload["seed"], payload["num_inference_steps"], payload["fps"]) == (42, 3, 8)
    assert payload["num_frames"] == 17, "2 s at 8 fps"
    assert payload["attention"]["select"] == "topk" and payload["attention"]["topk"] == 3


def test_json_and_urlencoded_create(server, http):
    r = http.post("/v1/videos", json={"prompt": "json", "seconds": 1, "size": "64x64"})
    assert r.status_code == 200 and r.json()["size"] == "64x64"
    r = http.post("/v1/videos", data={"prompt": "form", "attention[backend]": "dense"})
    assert r.status_code == 200 and r.json()["attention"]["backend"] == "dense"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(model="sora-2"), ["sora-2", "unknown", "tiny-wan2.1-t2v"]),
        (dict(size="big"), ["WIDTHxHEIGHT", "big"]),
        (dict(size="100x100"), ["multiple of 16", "100"]),
        (dict(size="1920x1088"), ["1920x1088", "pixels"]),
        (dict(seconds="12"), ["seconds=12", "193 frames", "81 frames"]),
        (dict(seconds="0"), ["positive", "'0'"]),
    ],
)
def test_bad_create_is_a_400_the_client_can_read(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="p", **kwargs)
    assert e.value.status_code == 400
    message = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    for word in words:
        assert word in message, (word, message)


def test_input_reference_to_a_text_to_video_model_is_refused(server):
    r = httpx.post(
        f"{server.url}/v1/videos",
        data={"prompt": "p"},
        files={"input_reference": ("ref.png", b"\x89PNG....", "image/png")},
    )
    assert r.status_code == 400 and "text-to-video only" in r.json()["error"]["message"]
