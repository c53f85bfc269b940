"""How a job's files appear all at once under `DATA_DIR` (layout: `contract.files`).

A job writes into its own staging directory and publishes it with one `rename` onto
`jobs/<job_id>`, so readers never see a half-written result: either the directory is complete or
it does not exist. A worker killed mid-write leaves only a staging directory, which the janitor
removes. Only server-made ids (`video_<32 hex>`) ever become paths.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from contract.files import JOBS_DIR, STAGING_DIR, VIDEO_FILE, job_dir
from contract.keys import JOB_ID_RE, check_job_id


class Staged:
    """A job's files being written; `publish()` makes them visible in one rename."""

    def __init__(self, storage: ResultStorage, job_id: str, path: Path):
        self.storage = storage
        self.job_id = job_id
        self.path = path
        self.published = False

    def file(self, name: str) -> Path:
        """Path of file `name` inside the staging directory."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"file name must be a plain name, got {name!r}")
        return self.path / name

    def write_json(self, name: str, data: dict) -> Path:
        path = self.file(name)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return path

    def publish(self) -> Path:
        """Replace `jobs/<job_id>` (a retry may have left one) with the staged files."""
        final = self.storage.job_dir(self.job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self.path):
            _fsync_file(self.path / name)
        if final.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first, so a
            # reader sees the old result or the new one, then none for an instant at worst.
            old = self.storage.staging_dir / f"{self.job_id}.old.{secrets.token_hex(4)}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(self.path, final)
        self.published = True
        return final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.published:
            self.discard()


class ResultStorage:
    """The results tree under `data_dir` (see the module docstring)."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.jobs_dir = self.root / JOBS_DIR
        self.staging_dir = self.root / STAGING_DIR

    def job_dir(self, job_id: str) -> Path:
        return job_dir(self.root, job_id)

    def stage(self, job_id: str) -> Staged:
        """A fresh staging directory for `job_id`; use as a context manager (discarded unless
        published)."""
        check_job_id(job_id)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = self.staging_dir / f"{job_id}.{secrets.token_hex(4)}"
        path.mkdir()
        return Staged(self, job_id, path)

    def exists(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / VIDEO_FILE).is_file()

    def remove(self, job_id: str) -> bool:
        """Delete a job's published files; True if there were any."""
        path = self.job_dir(job_id)
        if not path.exists():
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True

    def job_ids(self) -> list[str]:
        """Ids of the published job directories (anything else in `jobs/` is ignored)."""
        if not self.jobs_dir.is_dir():
            return []
        return sorted(n for n in os.listdir(self.jobs_dir) if JOB_ID_RE.fullmatch(n))

    def age_s(self, job_id: str) -> float:
        """Seconds since the job's directory was last modified (0 if it is gone)."""
        try:
            return max(0.0, time.time() - self.job_dir(job_id).stat().st_mtime)
        except FileNotFoundError:
            return 0.0

    def clean_staging(self, older_than_s: float) -> list[str]:
        """Remove staging directories untouched for `older_than_s` (left by killed workers)."""
        if not self.staging_dir.is_dir():
            return []
        removed = []
        cutoff = time.time() - older_than_s
        for entry in os.scandir(self.staging_dir):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue
        return removed


def _fsync_file(path: Path) -> None:
    """Flush a file to disk before it is published (a crash must not publish empty files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
