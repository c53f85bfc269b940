"""The settings both the API and the workers read, defined once (pydantic-settings; field names
are the environment variable names, units in the names)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .models import ModelSpec, custom_model, resolve_model_id
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
    MODEL: str = "tiny"
    """The models served, comma-separated, the first the default for requests that name none:
    registry ids (`wan2.1-t2v-1.3b`, docs/models.md), their hub ids, tiny twins (`tiny`,
    `tiny-<family>`), full-size random twins (`<id>-random`), or one local directory / other hub
    id with the architecture of `MODEL_BASE`. Each worker loads these; each model has its own
    queue."""
    MODEL_BASE: str = "wan2.1-t2v-1.3b"
    """Registry model whose architecture and defaults a `MODEL` outside the registry has."""
    VMOBA_TRAINED: bool = False
    """A `MODEL` outside the registry was fine-tuned with VMoBA: it defaults to threshold_global
    (stock weights default to the paper's training-free top-k)."""

    @field_validator("MODEL")
    @classmethod
    def _some_model(cls, value: str) -> str:
        if not [m for m in value.split(",") if m.strip()]:
            raise ValueError("MODEL names no model")
        return value

    def models(self) -> list[ModelSpec]:
        """The served models' specs, in `MODEL` order (`KeyError` for a bad `MODEL_BASE`)."""
        from .models import REGISTRY

        specs = []
        for name in (m.strip() for m in self.MODEL.split(",") if m.strip()):
            model_id = resolve_model_id(name)
            specs.append(
                REGISTRY[model_id]
                if model_id
                else custom_model(name, self.MODEL_BASE, vmoba_trained=self.VMOBA_TRAINED)
            )
        return specs

    @field_validator("STORAGE_URL")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        return check_storage_url(value)
