"""Results tree: ids checked before they become paths, files appear all at once."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from contract.files import META_FILE, VIDEO_FILE
from contract.keys import check_job_id
from worker.storage import ResultStorage


def new_id() -> str:
    return "video_" + uuid.uuid4().hex


@pytest.mark.parametrize(
    "bad",
    [
        "../etc",
        "video_" + "0" * 31,
        "video_" + "G" * 32,
        "video_../x",
        "/abs",
        "",
        None,
        5,
        "video_" + "a" * 32 + "/x",
    ],
)
def test_only_server_made_ids_become_paths(tmp_path, bad):
    with pytest.raises(ValueError, match="job id must look like"):
        ResultStorage(tmp_path).job_dir(bad)


def test_staged_files_appear_only_when_published(tmp_path):
    storage = ResultStorage(tmp_path)
    job_id = new_id()
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(os.urandom(100))
        staged.write_json(META_FILE, {"seed": 7})
        assert not storage.job_dir(job_id).exists()  # nothing visible yet
        final = staged.publish()
    assert final == storage.job_dir(job_id) == tmp_path / "jobs" / job_id
    assert storage.exists(job_id)
    assert json.loads((final / META_FILE).read_text()) == {"seed": 7}
    assert os.listdir(storage.staging_dir) == []
    assert storage.job_ids() == [job_id]


def test_failed_write_leaves_nothing(tmp_path):
    storage = ResultStorage(tmp_path)
    job_id = new_id()
    with pytest.raises(RuntimeError), storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert not storage.job_dir(job_id).exists()
    assert os.listdir(storage.staging_dir) == []


def test_republish_replaces_a_previous_attempt(tmp_path):
    storage = ResultStorage(tmp_path)
    job_id = new_id()
    for content in (b"first", b"second"):
        with storage.stage(job_id) as staged:
            staged.file(VIDEO_FILE).write_bytes(content)
            staged.publish()
    assert (storage.job_dir(job_id) / VIDEO_FILE).read_bytes() == b"second"
    assert os.listdir(storage.staging_dir) == []


def test_remove_and_stale_staging_cleanup(tmp_path):
    storage = ResultStorage(tmp_path)
    job_id = new_id()
    with storage.stage(job_id) as staged:
        staged.file(VIDEO_FILE).write_bytes(b"x")
        staged.publish()
    assert storage.remove(job_id) and not storage.remove(job_id)
    assert storage.job_ids() == []

    # A killed worker's leftovers: an old staging dir goes, a fresh one (a live write) stays.
    old = storage.stage(new_id()).path
    fresh = storage.stage(new_id()).path
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert storage.clean_staging(older_than_s=600) == [old.name]
    assert not old.exists() and fresh.exists()


def test_file_names_cannot_escape_staging(tmp_path):
    with ResultStorage(tmp_path).stage(new_id()) as staged:
        for bad in ("../x", ".hidden", "a/b"):
            with pytest.raises(ValueError, match="plain name"):
                staged.file(bad)
    assert check_job_id("video_" + "ab" * 16)
