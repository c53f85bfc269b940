"""End to end with results in object storage: `python -m service.serve` (private Redis, real
uvicorn, real CPU worker with the tiny model) with `STORAGE_URL=s3://...` pointing at moto's
standalone S3 server, the way a newcomer would run it against MinIO or S3: the worker uploads,
the API streams from storage, a delete removes the objects, and nothing lands in `DATA_DIR/jobs`."""

from __future__ import annotations

import time
import uuid
import warnings

import httpx
import openai
import pytest
from stack import decode, running, sse_events

from contract.files import META_FILE, THUMBNAIL_FILE, VIDEO_FILE

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PREFIX = "e2e/results"


@pytest.fixture(scope="module")
def bucket(moto_server):
    name = f"vmoba-e2e-{uuid.uuid4().hex[:8]}"
    moto_server.make_bucket(name)
    return name


@pytest.fixture(scope="module")
def stack(tmp_path_factory, moto_server, bucket):
    tmp = tmp_path_factory.mktemp("serve-s3")
    with running(tmp, STORAGE_URL=f"s3://{bucket}/{PREFIX}", **moto_server.env()) as s:
        s.data_dir = tmp / "data"
        yield s


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def test_the_newcomer_flow_with_object_storage(stack, http, moto_server, bucket, tmp_path):
    body = {"prompt": "a lighthouse", "num_frames": 9, "width": 64, "height": 48, "fps": 8}
    job_id = http.post("/generate", json={**body, "num_inference_steps": 2}).json()["id"]
    names = [e for e, _ in sse_events(f"{stack.url}/jobs/{job_id}/events")]
    assert names[-1] == "completed", (names, stack.log.read_text()[-3000:])
    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["timings"]["upload_s"] >= 0

    keys = moto_server.keys(bucket, f"{PREFIX}/jobs/{job_id}/")
    assert keys == sorted(
        f"{PREFIX}/jobs/{job_id}/{n}" for n in (META_FILE, THUMBNAIL_FILE, VIDEO_FILE)
    )
    assert not (stack.data_dir / "jobs").exists()  # results live in storage only

    video = http.get(f"/jobs/{job_id}/video")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert decode(video.content, tmp_path) == (9, 64, 48, 8.0)
    part = http.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == video.content[100:200]
    assert http.get(f"/jobs/{job_id}/thumbnail").content[:2] == b"\xff\xd8"

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        made = client.videos.create_and_poll(
            prompt="a paper boat", seconds="1", size="32x32", extra_body={"num_inference_steps": 1}
        )
        assert made.status == "completed", made
        data = client.videos.download_content(made.id).read()
        assert decode(data, tmp_path)[:3] == (17, 32, 32)
        assert client.videos.delete(made.id).deleted
    assert moto_server.keys(bucket, f"{PREFIX}/jobs/{made.id}/") == []

    assert http.delete(f"/jobs/{job_id}").json()["deleted"] is True
    assert moto_server.keys(bucket, PREFIX) == []
    assert http.get(f"/jobs/{job_id}/video").status_code == 404
    deadline = time.time() + 5
    while time.time() < deadline and any((stack.data_dir / "staging").glob("video_*")):
        time.sleep(0.1)
    assert not any((stack.data_dir / "staging").glob("video_*"))  # no staged copy left behind
