"""Where a job's results live (the API serves them; workers write them; `contract.storage`
reads and writes them), under `DATA_DIR` or, with `STORAGE_URL=s3://bucket/prefix`, under the
object prefix `prefix/`:

```
DATA_DIR/jobs/<job_id>/video.mp4        H.264 mp4                  s3://bucket/prefix/jobs/<job_id>/video.mp4
DATA_DIR/jobs/<job_id>/thumbnail.jpg    preview image              .../jobs/<job_id>/thumbnail.jpg
DATA_DIR/jobs/<job_id>/meta.json        sidecar: everything needed to reproduce and judge the result;
                                        in object storage written last: it marks the result complete
DATA_DIR/staging/<job_id>.<random>/     a job's files while they are being written (on the worker's disk)
```

Only server-made ids (`video_<32 hex>`) ever become paths or keys.
"""

from __future__ import annotations

from pathlib import Path

from .keys import check_job_id

VIDEO_FILE = "video.mp4"
THUMBNAIL_FILE = "thumbnail.jpg"
META_FILE = "meta.json"
INPUT_FILE = "input.png"  # an image-to-video job's first frame, as fitted to the video
RESULT_FILES = (VIDEO_FILE, THUMBNAIL_FILE, META_FILE)
JOBS_DIR = "jobs"
STAGING_DIR = "staging"


def job_dir(data_dir: str | Path, job_id: str) -> Path:
    """`DATA_DIR/jobs/<job_id>`; `ValueError` for anything but a server-made id."""
    return Path(data_dir) / JOBS_DIR / check_job_id(job_id)
