"""The worker's view of results storage: `contract.storage` (shared with the API, which serves and
deletes what workers write).

`ResultStorage` is the local-folder storage under `DATA_DIR` (staged files published with one
rename); `open_storage(settings)` gives whichever `STORAGE_URL` names, S3-compatible object storage
included, with the worker's upload settings.
"""

from __future__ import annotations

from contract.storage import LocalStorage, Staged, Storage, StorageUnavailable
from contract.storage import open_storage as _open

from .settings import WorkerSettings

ResultStorage = LocalStorage

__all__ = ["ResultStorage", "Staged", "Storage", "StorageUnavailable", "open_storage"]


def open_storage(settings: WorkerSettings) -> Storage:
    """The storage of `settings.STORAGE_URL` (the folder `DATA_DIR` when unset)."""
    return _open(
        settings.STORAGE_URL,
        settings.DATA_DIR,
        multipart_threshold_bytes=settings.STORAGE_MULTIPART_BYTES,
    )
