"""The storage interface (`Storage`), its staging area (`Staged`) and its errors.

A worker writes a job's files into a staging directory on its own disk (`DATA_DIR/staging`), then
`Staged.publish()` makes them visible at once: a rename for the local folder, uploads with the
sidecar last for object storage. Until `publish()` returns the files stay in the staging directory,
so a worker can retry a publish that failed (storage unreachable) without losing anything.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from ..files import META_FILE, STAGING_DIR, VIDEO_FILE
from ..keys import check_job_id


class StorageUnavailable(Exception):
    """Storage could not be reached or refused the request (network down, 5xx, 403, bad
    credentials, missing bucket): try again later. Never raised for a file that does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    """What HTTP needs to serve one stored file."""

    size: int
    etag: str  # quoted, as it goes into an ETag header
    last_modified: float  # seconds since the epoch


class Body(Protocol):
    """An open stored file (or byte range of one): read it in chunks, then close it."""

    def read(self, amt: int) -> bytes: ...

    def close(self) -> None: ...


class Staged:
    """A job's files being written; `publish()` makes them visible all at once."""

    def __init__(self, storage: Storage, job_id: str, path: Path):
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

    def publish(self) -> Path | str:
        """Make the staged files the job's result, replacing a previous attempt's; returns where
        they are. Raises `StorageUnavailable` (the files stay staged: call again) when storage
        cannot take them."""
        where = self.storage.publish(self)
        self.published = True
        return where

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Unpublished files are dropped; published ones live in storage now (the local folder
        # moved the directory itself, object storage has copies).
        self.discard()


class Storage(ABC):
    """Where finished jobs' files live (see `contract.files` for the layout).

    Worker side: `stage`, `Staged.publish`, `clean_staging`. API side: `stat`, `open`,
    `presigned_url` (or `local_path`). Both: `remove`, `exists`, `job_ids`, `age_s`. Every call
    blocks (run it in a thread from async code) and raises `StorageUnavailable` when storage
    cannot answer.
    """

    kind: ClassVar[str]

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.staging_dir = self.root / STAGING_DIR

    # -- worker side -----------------------------------------------------------------------------
    def stage(self, job_id: str) -> Staged:
        """A fresh staging directory for `job_id`; use as a context manager (removed on leaving,
        published or not)."""
        check_job_id(job_id)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = self.staging_dir / f"{job_id}.{secrets.token_hex(4)}"
        path.mkdir()
        return Staged(self, job_id, path)

    @abstractmethod
    def publish(self, staged: Staged) -> Path | str:
        """Make `staged`'s files the job's result, all at once for readers; returns where."""

    def clean_staging(self, older_than_s: float) -> list[str]:
        """Remove staging directories untouched for `older_than_s` (left by killed workers)."""
        if not self.staging_dir.is_dir():
            return []
        removed = []
        cutoff = time.time() - older_than_s
        for entry in os.scandir(self.staging_dir):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue
        return removed

    # -- API side --------------------------------------------------------------------------------
    @abstractmethod
    def stat(self, job_id: str, name: str) -> ObjectInfo | None:
        """Size, ETag and modification time of a published file; None if it does not exist."""

    @abstractmethod
    def open(self, job_id: str, name: str, start: int = 0, end: int | None = None) -> Body:
        """Bytes `[start, end)` of a published file (`end=None`: to its end).
        `FileNotFoundError` if it does not exist."""

    def local_path(self, job_id: str, name: str) -> Path | None:
        """The file's path when it is on this machine's disk (the API then serves it itself)."""
        return None

    def presigned_url(
        self,
        job_id: str,
        name: str,
        *,
        expires_s: int,
        content_type: str | None = None,
        content_disposition: str | None = None,
    ) -> str | None:
        """A URL that lets anyone holding it GET the file for `expires_s`; None where storage
        has no such URLs (the local folder)."""
        return None

    # -- both ------------------------------------------------------------------------------------
    @abstractmethod
    def remove(self, job_id: str) -> bool:
        """Delete every file of a job; True if there were any."""

    @abstractmethod
    def exists(self, job_id: str) -> bool:
        """Whether the job has a complete published result."""

    def finished_result(self, job_id: str) -> dict | None:
        """The sidecar (`meta.json`) of a job whose result is complete, i.e. its video and its
        sidecar are both published (the sidecar goes last, and `remove` takes it first); None
        otherwise. The janitor uses it to tell a finished job from a lost one."""
        if self.stat(job_id, META_FILE) is None or self.stat(job_id, VIDEO_FILE) is None:
            return None
        try:
            body = self.open(job_id, META_FILE)
        except FileNotFoundError:
            return None
        try:
            chunks = []
            while chunk := body.read(1 << 16):
                chunks.append(chunk)
        finally:
            body.close()
        try:
            meta = json.loads(b"".join(chunks))
        except ValueError:
            return None
        return meta if isinstance(meta, dict) and meta.get("id") == job_id else None

    @abstractmethod
    def job_ids(self) -> list[str]:
        """Ids of the jobs with files in storage (anything else there is ignored)."""

    @abstractmethod
    def age_s(self, job_id: str) -> float:
        """Seconds since the job's files were last written (0 if there are none)."""

    @abstractmethod
    def check(self) -> None:
        """Raise `StorageUnavailable` unless storage answers (a start-up or readiness probe)."""

    def describe(self) -> str:
        """Where the results go, for logs."""
        return f"{self.kind} {self.root}"
