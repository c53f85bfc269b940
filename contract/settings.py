"""The settings both the API and the workers read, defined once (pydantic-settings; field names
are the environment variable names, units in the names)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .request import TINY_MODEL
from .storage import check_storage_url


class SharedSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", env_file=None)

    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    """Redis holding the RQ queue, the job records, heartbeats and events. `make serve` starts a
    private server and sets this when it is not given."""
    DATA_DIR: Path = Path("./var/data")
    """Results root (`contract.files`), a volume shared by the API and the workers. With
    `STORAGE_URL` set it holds only each process's own staging files."""
    STORAGE_URL: str = ""
    """Where results live (`contract.storage`): empty for the folder `DATA_DIR`, or
    `s3://bucket/prefix` for S3-compatible object storage (endpoint, region and credentials from
    `AWS_ENDPOINT_URL` or `S3_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`), so workers on several hosts need no shared filesystem."""
    QUEUE_NAME: str = "vmoba"
    """RQ queue the API enqueues to; a worker may list several, comma-separated, worked in
    priority order."""
    RETENTION_S: int = Field(24 * 3600, ge=60)
    """How long a finished job's record and files are kept after it ends (1 day)."""
    MODEL: str = TINY_MODEL
    """The pipeline the workers run: `tiny` (random weights, built in code), a hub id or a local
    diffusers directory."""

    @field_validator("STORAGE_URL")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        return check_storage_url(value)
