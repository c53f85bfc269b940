"""Results in a folder (`DATA_DIR`), shared by the API and the workers of one host (or over NFS).

A job writes into its own staging directory and publishes it with one `rename` onto
`jobs/<job_id>`, so readers never see a half-written result: either the directory is complete or
it does not exist. A worker killed mid-write leaves only a staging directory, which the janitor
removes. Only server-made ids (`video_<32 hex>`) ever become paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import BinaryIO, ClassVar

from ..files import JOBS_DIR, META_FILE, VIDEO_FILE, job_dir
from ..keys import JOB_ID_RE
from .base import ObjectInfo, Staged, Storage


class LocalStorage(Storage):
    """The results tree under `data_dir` (see the module docstring)."""

    kind: ClassVar[str] = "local"

    def __init__(self, data_dir: str | Path):
        super().__init__(data_dir)
        self.jobs_dir = self.root / JOBS_DIR

    def job_dir(self, job_id: str) -> Path:
        return job_dir(self.root, job_id)

    def publish(self, staged: Staged) -> Path:
        """Replace `jobs/<job_id>` (a retry may have left one) with the staged files."""
        final = self.job_dir(staged.job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(staged.path):
            _fsync_file(staged.path / name)
        if final.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first, so a
            # reader sees the old result or the new one, then none for an instant at worst.
            old = self.staging_dir / f"{staged.job_id}.old.{secrets.token_hex(4)}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staged.path, final)
        return final

    def local_path(self, job_id: str, name: str) -> Path:
        return self.job_dir(job_id) / _plain(name)

    def stat(self, job_id: str, name: str) -> ObjectInfo | None:
        try:
            st = os.stat(self.local_path(job_id, name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        # The same ETag starlette's FileResponse sends for this file.
        tag = hashlib.md5(f"{st.st_mtime}-{st.st_size}".encode(), usedforsecurity=False)
        return ObjectInfo(size=st.st_size, etag=f'"{tag.hexdigest()}"', last_modified=st.st_mtime)

    def open(self, job_id: str, name: str, start: int = 0, end: int | None = None) -> _Slice:
        f = open(self.local_path(job_id, name), "rb")  # noqa: SIM115 - closed by the caller
        f.seek(start)
        return _Slice(f, None if end is None else end - start)

    def exists(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / VIDEO_FILE).is_file()

    def remove(self, job_id: str) -> bool:
        path = self.job_dir(job_id)
        if not path.exists():
            return False
        # The sidecar first: files left by an interrupted removal never look like a result.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(path / META_FILE)
        shutil.rmtree(path, ignore_errors=True)
        return True

    def job_ids(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return sorted(n for n in os.listdir(self.jobs_dir) if JOB_ID_RE.fullmatch(n))

    def age_s(self, job_id: str) -> float:
        """Seconds since the job's directory was last modified (0 if it is gone)."""
        try:
            return max(0.0, time.time() - self.job_dir(job_id).stat().st_mtime)
        except FileNotFoundError:
            return 0.0

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class _Slice:
    """At most `length` bytes of an open file."""

    def __init__(self, f: BinaryIO, length: int | None):
        self.f = f
        self.left = length

    def read(self, amt: int) -> bytes:
        if self.left is None:
            return self.f.read(amt)
        data = self.f.read(min(amt, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


def _plain(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"file name must be a plain name, got {name!r}")
    return name


def _fsync_file(path: Path) -> None:
    """Flush a file to disk before it is published (a crash must not publish empty files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
