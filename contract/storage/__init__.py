"""Where finished jobs' files live, for the API (serving, deleting) and the workers (writing,
retention): one interface, `Storage`, and two implementations.

- `LocalStorage`: a folder, `DATA_DIR` (the default, `STORAGE_URL` unset): the API and the workers
  share it (one host, or a shared filesystem). Staged files are published with one rename.
- `S3Storage`: S3-compatible object storage, `STORAGE_URL=s3://bucket/prefix` (boto3; endpoint,
  region and credentials from the usual `AWS_*` environment variables), so workers on many hosts
  serve one API with no shared filesystem. Staged files are uploaded, the sidecar last.

```python
storage = open_storage(settings)               # from STORAGE_URL / DATA_DIR
with storage.stage(job_id) as staged:          # worker: write into a local staging directory
    staged.file("video.mp4").write_bytes(...)
    staged.publish()                           # StorageUnavailable: still staged, try again
info = storage.stat(job_id, "video.mp4")       # API: size/etag/mtime or None
body = storage.open(job_id, "video.mp4", 100, 200)   # bytes [100, 200): .read(n), .close()
```

Torch-free and service-free: both processes import it. boto3 is imported only for `s3://`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Body, ObjectInfo, Staged, Storage, StorageUnavailable
from .local import LocalStorage

__all__ = [
    "Body",
    "LocalStorage",
    "ObjectInfo",
    "Staged",
    "Storage",
    "StorageUnavailable",
    "check_storage_url",
    "open_storage",
]


def check_storage_url(url: str) -> str:
    """`url` stripped if it is a storage URL this package opens (empty: the local folder;
    `s3://bucket/prefix`), else `ValueError` saying what is allowed."""
    url = url.strip()
    if url:
        from .s3 import parse_s3_url

        parse_s3_url(url)
    return url


def open_storage(storage_url: str, data_dir: str | Path, **s3_options: Any) -> Storage:
    """The storage `storage_url` names: empty for the folder `data_dir`, `s3://bucket/prefix`
    for object storage (`s3_options` go to `S3Storage`; `data_dir` then holds staging only)."""
    url = check_storage_url(storage_url)
    if not url:
        return LocalStorage(data_dir)
    from .s3 import S3Storage

    return S3Storage(url, data_dir, **s3_options)
