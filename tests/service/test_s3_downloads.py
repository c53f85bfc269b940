"""The API with results in S3-compatible object storage (moto's standalone server over HTTP):
files streamed with Range, redirects to presigned URLs, deletes, and 503 + Retry-After while
storage is down. The worker is played through `JobStore` and `contract.storage`."""

from __future__ import annotations

import os

import httpx
import pytest

from contract.files import META_FILE, THUMBNAIL_FILE, VIDEO_FILE
from contract.storage import open_storage
from service.cli import Client


def finish_job(store, storage, job_id: str, video: bytes) -> None:
    """What a worker does: started, files published to storage, completed."""
    assert store.mark_started(job_id, worker="test-worker")
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(video)
        staged.file(THUMBNAIL_FILE).write_bytes(b"\xff\xd8\xff" + os.urandom(100))
        staged.write_json(META_FILE, {"id": job_id})
        staged.publish()
    assert store.mark_completed(job_id, files=[VIDEO_FILE, THUMBNAIL_FILE, META_FILE])


@pytest.fixture
def completed(store, tmp_path):
    """`completed(server, s3)` -> `(job_id, video bytes)` of a finished job in `s3`."""

    def make(server, s3, size: int = 300_000):
        with httpx.Client(base_url=server.url) as http:
            job_id = http.post("/generate", json={"prompt": "a fox"}).json()["id"]
        video = os.urandom(size)
        finish_job(store, open_storage(s3.url, tmp_path / "worker"), job_id, video)
        return job_id, video

    return make


def test_files_are_streamed_from_storage_with_range(make_server, s3, completed):
    server = make_server(STORAGE_URL=s3.url)
    job_id, video = completed(server, s3)
    size = len(video)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get(f"/jobs/{job_id}/video")
        assert r.status_code == 200 and r.content == video
        assert r.headers["content-type"] == "video/mp4"
        assert r.headers["content-length"] == str(size)
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-disposition"] == f'inline; filename="{job_id}.mp4"'
        etag, modified = r.headers["etag"], r.headers["last-modified"]

        for header, (start, end) in {
            "bytes=100-199": (100, 200),
            "bytes=-1000": (size - 1000, size),
            f"bytes={size - 10}-": (size - 10, size),
            f"bytes=0-{size + 50}": (0, size),
            "bytes=5-9, 7-20": (5, 21),  # overlapping parts merge into one
        }.items():
            part = http.get(f"/jobs/{job_id}/video", headers={"Range": header})
            assert part.status_code == 206, header
            assert part.content == video[start:end], header
            assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
            assert part.headers["content-length"] == str(end - start)
            assert part.headers["content-type"] == "video/mp4"

        bad = http.get(f"/jobs/{job_id}/video", headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        assert bad.json()["error"]["code"] == "range_not_satisfiable"
        assert http.get(f"/jobs/{job_id}/video", headers={"Range": "lines=1-2"}).status_code == 400
        # Several disjoint ranges, or a stale If-Range: the whole file.
        several = http.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=0-1,10-11"})
        assert several.status_code == 200 and several.content == video
        stale = {"Range": "bytes=0-1", "If-Range": '"not-the-etag"'}
        assert http.get(f"/jobs/{job_id}/video", headers=stale).status_code == 200
        for validator in (etag, modified):
            fresh = {"Range": "bytes=0-1", "If-Range": validator}
            assert http.get(f"/jobs/{job_id}/video", headers=fresh).status_code == 206

        head = http.head(f"/jobs/{job_id}/video", headers={"Range": "bytes=10-19"})
        assert head.status_code == 206 and head.headers["content-length"] == "10"
        assert head.content == b""

        thumb = http.get(f"/v1/videos/{job_id}/content", params={"variant": "thumbnail"})
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
        assert thumb.headers["content-type"] == "image/jpeg"
        assert "content-disposition" not in thumb.headers
        openai = http.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=0-99"})
        assert openai.status_code == 206 and openai.content == video[:100]


def test_redirect_to_a_presigned_url(make_server, s3, completed, moto_server, tmp_path):
    public = moto_server.url.replace("127.0.0.1", "localhost")
    server = make_server(
        STORAGE_URL=s3.url,
        STORAGE_REDIRECT=True,
        STORAGE_REDIRECT_EXPIRY_S=120,
        STORAGE_PUBLIC_ENDPOINT_URL=public,
    )
    job_id, video = completed(server, s3)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get(f"/jobs/{job_id}/video")
        assert r.status_code == 307 and r.headers["cache-control"] == "no-store"
        location = r.headers["location"]
        assert location.startswith(f"{public}/{s3.bucket}/{s3.prefix}/jobs/{job_id}/video.mp4?")
        assert "X-Amz-Expires=120" in location and "X-Amz-Signature=" in location
        got = httpx.get(location)
        assert got.status_code == 200 and got.content == video
        assert got.headers["content-type"] == "video/mp4"
        assert got.headers["content-disposition"] == f'inline; filename="{job_id}.mp4"'
        part = httpx.get(location, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == video[10:20]
        # What clients do: follow the redirect.
        followed = http.get(f"/v1/videos/{job_id}/content", follow_redirects=True)
        assert followed.status_code == 200 and followed.content == video
        assert http.get(f"/jobs/{job_id}/thumbnail").status_code == 307
    out = tmp_path / "cli.mp4"  # the command-line client follows it too
    assert Client(server.url, api_key=None).download(job_id, out) == len(video)
    assert out.read_bytes() == video


def test_delete_removes_the_objects(make_server, s3, completed):
    server = make_server(STORAGE_URL=s3.url)
    job_id, _ = completed(server, s3)
    other, _ = completed(server, s3)
    assert s3.job_keys(job_id) == sorted([META_FILE, THUMBNAIL_FILE, VIDEO_FILE])
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.delete(f"/jobs/{job_id}").json()["deleted"] is True
        assert s3.job_keys(job_id) == [] and len(s3.job_keys(other)) == 3
        assert http.get(f"/jobs/{job_id}/video").status_code == 404
        assert http.delete(f"/v1/videos/{other}").json()["deleted"] is True
    assert s3.keys() == []


def test_a_missing_object_is_a_404(make_server, s3, completed, moto_server):
    server = make_server(STORAGE_URL=s3.url)
    job_id, _ = completed(server, s3)
    moto_server.client().delete_object(Bucket=s3.bucket, Key=f"{s3.prefix}/jobs/{job_id}/video.mp4")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get(f"/jobs/{job_id}/video")
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_missing"


def test_storage_down_is_a_503_with_retry_after(make_server, make_moto, make_s3, completed):
    moto = make_moto()
    s3 = make_s3(moto)
    streaming = make_server(STORAGE_URL=s3.url, RETRY_AFTER_S=7)
    redirecting = make_server(STORAGE_URL=s3.url, STORAGE_REDIRECT=True)
    job_id, video = completed(streaming, s3)
    moto.stop()
    with httpx.Client(timeout=30) as http:
        for server, method, path in (
            (streaming, "GET", f"/jobs/{job_id}/video"),
            (streaming, "HEAD", f"/jobs/{job_id}/thumbnail"),
            (streaming, "GET", f"/v1/videos/{job_id}/content"),
            (redirecting, "GET", f"/jobs/{job_id}/video"),
            (streaming, "DELETE", f"/jobs/{job_id}"),
        ):
            r = http.request(method, server.url + path, headers={"Range": "bytes=0-9"})
            assert r.status_code == 503, (method, path, r.status_code)
            assert int(r.headers["retry-after"]) > 0
            if method != "HEAD":
                error = r.json()["error"]
                assert error["code"] == "storage_unavailable" and error["type"] == "server_error"
                assert "storage" in error["message"] and moto.url not in error["message"]
        assert http.get(f"{streaming.url}/jobs/{job_id}/video").headers["retry-after"] == "7"
        # The job and its record are untouched: the delete can be retried.
        assert http.get(f"{streaming.url}/jobs/{job_id}").json()["status"] == "completed"

        moto.start()  # storage is back (moto comes back empty: publish again)
        moto.make_bucket(s3.bucket)
        with open_storage(s3.url, moto.log_path.parent / "w").stage(job_id) as staged:
            staged.file(VIDEO_FILE).write_bytes(video)
            staged.publish()
        r = http.get(f"{streaming.url}/jobs/{job_id}/video", headers={"Range": "bytes=0-9"})
        assert r.status_code == 206 and r.content == video[:10]
        assert http.delete(f"{streaming.url}/jobs/{job_id}").status_code == 200
        assert s3.keys() == []
