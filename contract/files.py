"""Where a job's results live under `DATA_DIR` (the API serves them; workers write them).

```
DATA_DIR/jobs/<job_id>/video.mp4        H.264 mp4
DATA_DIR/jobs/<job_id>/thumbnail.jpg    preview image
DATA_DIR/jobs/<job_id>/meta.json        sidecar: everything needed to reproduce and judge the result
DATA_DIR/staging/<job_id>.<random>/     a job's files while they are being written
```

Only server-made ids (`video_<32 hex>`) ever become paths.
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
