"""Job statuses, stages and error codes: one terminal set for the whole system."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Lifecycle of a job. `completed`, `failed` and `cancelled` are terminal."""

    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})
# The same, as the strings records and events carry.
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL_STATUSES)


class Stage(str, Enum):
    """Where a job is inside its run."""

    queued = "queued"
    denoising = "denoising"
    decoding = "decoding"
    encoding = "encoding"
    done = "done"


class ErrorCode(str, Enum):
    """Error codes carried by failed jobs and API errors."""

    invalid_request = "invalid_request"
    cancelled = "cancelled"
    timeout = "timeout"
    gpu_oom = "gpu_oom"
    worker_lost = "worker_lost"
    # The result could not be stored: object storage stayed unreachable (or refused the upload)
    # for the worker's whole STORAGE_RETRY_S.
    storage_unavailable = "storage_unavailable"
    internal_error = "internal_error"


# Share of `progress` per stage: denoising steps map to 0-90 %, then the stages below.
DENOISING_PERCENT = 90
STAGE_PERCENT = {Stage.decoding: 92, Stage.encoding: 96, Stage.done: 100}


def openai_status(status: JobStatus | str) -> str:
    """The OpenAI Videos status of a job: `cancelled` shows as `failed` (error code `cancelled`)."""
    status = JobStatus(status)
    return JobStatus.failed.value if status is JobStatus.cancelled else status.value


def enum_value(value: object) -> str:
    """The string of an enum member, or `str(value)`."""
    return str(value.value) if isinstance(value, Enum) else str(value)
