"""`contract.storage`: the local folder and S3-compatible object storage behind one interface.
Object storage is moto's standalone server over HTTP (`moto_server` in tests/conftest.py), reached
by boto3 through the usual `AWS_*` variables."""

from __future__ import annotations

import json
import os
import socket
import time

import httpx
import pytest
from pydantic import ValidationError

from contract.files import META_FILE, THUMBNAIL_FILE, VIDEO_FILE
from contract.keys import new_job_id
from contract.settings import SharedSettings
from contract.storage import LocalStorage, StorageUnavailable, open_storage
from contract.storage.s3 import S3Storage, endpoint_from_env, parse_s3_url, region_from_env

MiB = 1024 * 1024


def stage_job(storage, job_id: str, video: bytes) -> None:
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(video)
        staged.file(THUMBNAIL_FILE).write_bytes(b"\xff\xd8\xff" + os.urandom(50))
        staged.write_json(META_FILE, {"id": job_id})
        staged.publish()


def read_all(body) -> bytes:
    try:
        return b"".join(iter(lambda: body.read(64 * 1024), b""))
    finally:
        body.close()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "data")
    s3 = request.getfixturevalue("s3")
    return open_storage(s3.url, tmp_path / "data")


def test_both_storages_publish_serve_and_remove_alike(storage):
    job_id, other = new_job_id(), new_job_id()
    video = os.urandom(300_000)
    assert storage.stat(job_id, VIDEO_FILE) is None and not storage.exists(job_id)
    stage_job(storage, job_id, video)
    stage_job(storage, other, b"other")
    assert storage.exists(job_id) and storage.job_ids() == sorted([job_id, other])
    assert os.listdir(storage.staging_dir) == []  # nothing left on the worker's disk

    info = storage.stat(job_id, VIDEO_FILE)
    assert info.size == len(video) and info.etag.startswith('"') and info.etag.endswith('"')
    assert abs(info.last_modified - time.time()) < 60
    for start, end in ((0, None), (100, 200), (299_990, 300_000), (0, 1)):
        assert read_all(storage.open(job_id, VIDEO_FILE, start, end)) == video[start:end]
    with pytest.raises(FileNotFoundError):
        storage.open(job_id, "nothing.bin")
    assert json.loads(storage.open(job_id, META_FILE).read(10_000)) == {"id": job_id}
    assert 0 <= storage.age_s(job_id) < 60

    assert storage.remove(job_id) and not storage.remove(job_id)
    assert storage.stat(job_id, VIDEO_FILE) is None and not storage.exists(job_id)
    assert storage.job_ids() == [other] and storage.age_s(job_id) == 0
    storage.check()


def test_a_finished_result_is_the_video_with_its_sidecar(storage, monkeypatch):
    """`finished_result` (what the janitor trusts over a lost record) needs both files; and
    `remove` takes the sidecar first, so an interrupted removal never leaves a 'result'."""
    job_id, video_only = new_job_id(), new_job_id()
    assert storage.finished_result(job_id) is None
    stage_job(storage, job_id, b"video")
    assert storage.finished_result(job_id) == {"id": job_id}
    with storage.stage(video_only) as staged:
        staged.file(VIDEO_FILE).write_bytes(b"v")
        staged.publish()
    assert storage.finished_result(video_only) is None

    removed = []
    if isinstance(storage, LocalStorage):
        import shutil

        real = shutil.rmtree
        monkeypatch.setattr(
            shutil, "rmtree", lambda path, **kw: removed.append(sorted(os.listdir(path)))
        )
    else:
        monkeypatch.setattr(
            storage.client,
            "delete_objects",
            lambda **kw: removed.append(
                sorted(o["Key"].rsplit("/", 1)[1] for o in kw["Delete"]["Objects"])
            )
            or {},
        )
    storage.remove(job_id)  # the bulk removal "fails": only the sidecar went
    assert removed == [[THUMBNAIL_FILE, VIDEO_FILE]]
    assert storage.finished_result(job_id) is None
    if isinstance(storage, LocalStorage):
        real(storage.job_dir(job_id))


def test_a_failed_write_leaves_nothing_anywhere(storage):
    job_id = new_job_id()
    with pytest.raises(RuntimeError), storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert storage.job_ids() == [] and os.listdir(storage.staging_dir) == []


def test_object_keys_content_types_and_sidecar_last(s3, tmp_path, monkeypatch):
    storage = open_storage(s3.url, tmp_path)
    order = []
    upload = storage.upload
    monkeypatch.setattr(
        storage, "upload", lambda path, key: (order.append(path.name), upload(path, key))
    )
    job_id = new_job_id()
    stage_job(storage, job_id, b"\x00\x00\x00\x18ftypmp42")
    assert order == [THUMBNAIL_FILE, VIDEO_FILE, META_FILE]  # data files first, the sidecar last
    assert s3.keys() == sorted(f"{s3.prefix}/jobs/{job_id}/{n}" for n in order)
    client = s3.server.client()
    types = {
        n: client.head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/jobs/{job_id}/{n}")["ContentType"]
        for n in order
    }
    assert types == {
        VIDEO_FILE: "video/mp4",
        THUMBNAIL_FILE: "image/jpeg",
        META_FILE: "application/json",
    }


def test_an_interrupted_publish_is_invisible_and_can_be_retried(s3, tmp_path, monkeypatch):
    """Storage failing before the sidecar is up: readers find no result, the files stay staged,
    and the next attempt publishes them. A re-publish hides the old sidecar before replacing."""
    storage = open_storage(s3.url, tmp_path)
    job_id = new_job_id()
    stage_job(storage, job_id, b"first attempt")
    upload = storage.upload
    seen = []

    def failing_sidecar(path, key):
        seen.append((path.name, storage.exists(job_id)))
        if path.name == META_FILE:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url=s3.server.url)
        upload(path, key)

    monkeypatch.setattr(storage, "upload", failing_sidecar)
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(b"second attempt")
        staged.write_json(META_FILE, {"attempt": 2})
        with pytest.raises(StorageUnavailable, match="publishing job"):
            staged.publish()
        # The old sidecar went first: no reader takes the half-replaced files for a result.
        assert seen == [(VIDEO_FILE, False), (META_FILE, False)] and not storage.exists(job_id)
        assert sorted(os.listdir(staged.path)) == [META_FILE, VIDEO_FILE]  # still staged
        monkeypatch.setattr(storage, "upload", upload)
        staged.publish()
    assert storage.exists(job_id)
    assert storage.open(job_id, VIDEO_FILE).read(100) == b"second attempt"
    assert os.listdir(storage.staging_dir) == []


def test_files_above_the_threshold_go_up_in_parts(s3, tmp_path):
    storage = S3Storage(
        s3.url, tmp_path, multipart_threshold_bytes=1 * MiB, multipart_chunk_bytes=5 * MiB
    )
    job_id = new_job_id()
    video = os.urandom(6 * MiB)  # 2 parts: 5 MiB + 1 MiB
    stage_job(storage, job_id, video)
    # A multipart object's ETag is `<md5 of the parts' md5s>-<number of parts>`.
    assert storage.stat(job_id, VIDEO_FILE).etag.endswith('-2"')
    assert "-" not in storage.stat(job_id, THUMBNAIL_FILE).etag  # below the threshold: one PUT
    body = storage.open(job_id, VIDEO_FILE)
    assert body.read(7 * MiB) == video
    body.close()


def test_presigned_urls_download_the_same_bytes(s3, tmp_path):
    job_id = new_job_id()
    video = os.urandom(20_000)
    storage = open_storage(s3.url, tmp_path)
    stage_job(storage, job_id, video)
    url = storage.presigned_url(
        job_id,
        VIDEO_FILE,
        expires_s=60,
        content_type="video/mp4",
        content_disposition='inline; filename="x.mp4"',
    )
    assert url.startswith(f"{s3.server.url}/{s3.bucket}/{s3.prefix}/jobs/{job_id}/video.mp4?")
    assert "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == video
    assert r.headers["content-type"] == "video/mp4"
    assert r.headers["content-disposition"] == 'inline; filename="x.mp4"'

    # Signed for the endpoint clients reach (the servers may use an internal one).
    public = S3Storage(
        s3.url, tmp_path, public_endpoint_url=s3.server.url.replace("127.0.0.1", "localhost")
    )
    url = public.presigned_url(job_id, VIDEO_FILE, expires_s=60)
    assert url.startswith(f"http://localhost:{s3.server.port}/")
    assert httpx.get(url).content == video


def test_remove_takes_every_object_under_the_job_prefix(s3, tmp_path):
    storage = open_storage(s3.url, tmp_path)
    job_id, kept = new_job_id(), new_job_id()
    stage_job(storage, job_id, b"v")
    stage_job(storage, kept, b"k")
    client = s3.server.client()
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/jobs/{job_id}/extra/debug.log", Body=b"x")
    client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/jobs/not-a-job/x", Body=b"x")
    assert storage.job_ids() == sorted([job_id, kept])  # other names under jobs/ are ignored
    assert storage.remove(job_id)
    assert s3.job_keys(job_id) == [] and len(s3.job_keys(kept)) == 3
    assert s3.keys("jobs/not-a-job/") == [f"{s3.prefix}/jobs/not-a-job/x"]


def test_stale_multipart_uploads_are_aborted(s3, tmp_path):
    storage = open_storage(s3.url, tmp_path)
    client = s3.server.client()
    key = f"{s3.prefix}/jobs/{new_job_id()}/video.mp4"
    client.create_multipart_upload(Bucket=s3.bucket, Key=key)  # a worker killed mid-upload
    # (moto dates every upload in 2010, so a young upload cannot be shown kept here.)
    assert storage.clean_staging(older_than_s=3600) == [f"multipart:{key}"]
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_unreachable_or_refusing_storage_raises_storage_unavailable(s3, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = S3Storage(s3.url, tmp_path, endpoint_url=closed)
    job_id = new_job_id()
    t0 = time.monotonic()
    for call in (
        down.check,
        down.job_ids,
        lambda: down.stat(job_id, VIDEO_FILE),
        lambda: down.open(job_id, VIDEO_FILE),
        lambda: down.remove(job_id),
        lambda: stage_job(down, job_id, b"v"),
    ):
        with pytest.raises(StorageUnavailable, match="Could not connect"):
            call()
    assert time.monotonic() - t0 < 20  # a refused connection fails fast
    assert down.clean_staging(0) == []  # housekeeping only logs it
    assert os.listdir(down.staging_dir) == []

    no_bucket = S3Storage("s3://no-such-bucket-here/x", tmp_path)
    with pytest.raises(StorageUnavailable, match="404|NoSuchBucket"):
        no_bucket.check()
    with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
        stage_job(no_bucket, job_id, b"v")


def test_storage_urls_and_environment(monkeypatch, tmp_path):
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_url("s3://my.bucket/a/b/") == ("my.bucket", "a/b")
    for bad in (
        "s3://",
        "s3://UPPER/x",
        "s3://b",
        "http://bucket/x",
        "s3://bucket/a//b",
        "s3://bkt/../x",
    ):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    with pytest.raises(ValidationError, match="s3://bucket/prefix"):
        SharedSettings(STORAGE_URL="gs://bucket/x")
    assert SharedSettings(STORAGE_URL=" s3://bkt/p ").STORAGE_URL == "s3://bkt/p"
    assert isinstance(open_storage("", tmp_path), LocalStorage)

    assert endpoint_from_env({}) is None and region_from_env({}) == "us-east-1"
    assert endpoint_from_env({"S3_ENDPOINT_URL": "http://s3:9000"}) == "http://s3:9000"
    assert (
        endpoint_from_env({"S3_ENDPOINT_URL": "http://b", "AWS_ENDPOINT_URL": "http://a"})
        == "http://a"
    )
    assert region_from_env({"AWS_DEFAULT_REGION": "eu-west-1"}) == "eu-west-1"
    assert region_from_env({"AWS_DEFAULT_REGION": "x", "AWS_REGION": "eu-north-1"}) == "eu-north-1"
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    storage = open_storage("s3://bkt/p", tmp_path)
    assert storage.client.meta.endpoint_url == "http://minio:9000"
    assert storage.client.meta.region_name == "eu-central-1"
    assert storage.describe() == "s3://bkt/p/ at http://minio:9000 (eu-central-1)"
