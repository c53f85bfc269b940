"""Settings of the API process (one pydantic-settings class, read from the environment).

Units are in the names (`_S` seconds, `_PX` pixels). Every default
is documented where it is defined.

```python
from service.settings import get_settings
settings = get_settings()          # cached; tests build `ServiceSettings(...)` directly
settings.limits()                  # the request limits and defaults, as `Limits`
```
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator

from contract.files import job_dir
from contract.models import ModelSpec
from contract.request import Limits
from contract.settings import SharedSettings
from contract.storage import Storage, open_storage


class ServiceSettings(SharedSettings):
    """Environment of the API process. Field names are the environment variable names; the
    settings shared with the workers (`REDIS_URL`, `DATA_DIR`, `STORAGE_URL`, `QUEUE_NAME`,
    `RETENTION_S`, `MODEL`) come from `contract.settings.SharedSettings`."""

    # -- HTTP ----------------------------------------------------------------------------------
    # Interface and port of the API (`make serve` prints the URL).
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=1, le=65535)
    # Uvicorn worker processes for the API (`make serve`). Two hold 100 concurrent clients well
    # on a 2-core machine (bench/results/api-*.json); metrics are summed across them.
    API_WORKERS: int = Field(2, ge=1, le=64)
    # Comma-separated bearer keys; empty means no authentication. /healthz and /readyz stay open.
    # Each key sees only the jobs it created (any other job is a 404 to it).
    API_KEYS: str = ""
    # Comma-separated bearer keys that see and manage every job (operators). Accepted as well as
    # API_KEYS; setting only these turns authentication on too.
    ADMIN_API_KEYS: str = ""
    # A request's headers must arrive within this many seconds of the connection opening or the
    # request beginning (`service.http`), and its body within this many after them; else 408.
    HEADER_TIMEOUT_S: float = Field(10.0, gt=0)
    BODY_TIMEOUT_S: float = Field(30.0, gt=0)
    # Largest request body accepted (JSON or multipart), bytes.
    MAX_BODY_BYTES: int = Field(256 * 1024, ge=1024)
    # Image-to-video input images: largest file accepted, bytes (10 MiB), and largest image,
    # pixels (4096 x 4096). Bodies carrying one may be this much larger than MAX_BODY_BYTES.
    MAX_IMAGE_BYTES: int = Field(10 * 1024 * 1024, ge=1024)
    MAX_IMAGE_PIXELS: int = Field(4096 * 4096, ge=64 * 64)
    # Connections in the API's Redis pool, per API process.
    REDIS_MAX_CONNECTIONS: int = Field(256, ge=4)

    # -- queue and jobs ------------------------------------------------------------------------
    # Jobs waiting (queued, not started) beyond which POSTs get 429 + Retry-After.
    MAX_QUEUE_DEPTH: int = Field(64, ge=1)
    # A request whose estimated run time on the fastest worker serving its model (their measured
    # speed, `contract.speed`) exceeds this is refused with 400 and the estimate; 0 turns it off.
    # Requests are admitted while no serving worker has measured its speed yet.
    MAX_JOB_S: float = Field(3600.0, ge=0)
    # Retry-After sent with 429, and with 503 when results storage is unreachable, seconds.
    RETRY_AFTER_S: int = Field(10, ge=1)
    # How long an Idempotency-Key maps to its job (1 day).
    IDEMPOTENCY_TTL_S: int = Field(24 * 3600, ge=1)
    # `openai-poll-after-ms` sent on status GETs.
    POLL_AFTER_MS: int = Field(1000, ge=0)
    # Comment lines sent on idle event streams so proxies keep them open.
    SSE_PING_S: float = Field(15.0, gt=0)

    # -- results storage (`STORAGE_URL` is shared: `contract.settings`) ------------------------
    # With object storage: answer video/thumbnail downloads with a 307 redirect to a presigned
    # URL (the client fetches the bytes from storage) instead of streaming them through the API.
    STORAGE_REDIRECT: bool = False
    # How long a redirect's presigned URL stays valid, seconds.
    STORAGE_REDIRECT_EXPIRY_S: int = Field(300, ge=1, le=7 * 24 * 3600)
    # The storage endpoint as clients reach it, for presigned URLs, when the API reaches storage
    # at an internal address (e.g. http://minio:9000 inside compose); empty: the API's endpoint.
    STORAGE_PUBLIC_ENDPOINT_URL: str = ""

    # -- request limits (see `Limits`) ---------------------------------------------------------
    MAX_PROMPT_CHARS: int = Field(2000, ge=1)
    MIN_NUM_FRAMES: int = Field(5, ge=1)
    MAX_NUM_FRAMES: int = Field(129, ge=1)
    MIN_SIDE_PX: int = Field(32, ge=16)
    MAX_SIDE_PX: int = Field(1920, ge=16)
    # Largest width x height (720p).
    MAX_PIXELS: int = Field(1280 * 720, ge=256)
    MAX_STEPS: int = Field(100, ge=1)
    MAX_GUIDANCE_SCALE: float = Field(20.0, ge=0)
    MAX_FPS: int = Field(60, ge=1)
    # Defaults for omitted fields; unset means the model's (tiny: 17 x 128 x 128, 4 steps;
    # Wan: 81 x 480 x 832, 50 steps).
    DEFAULT_NUM_FRAMES: int | None = None
    DEFAULT_WIDTH: int | None = None
    DEFAULT_HEIGHT: int | None = None
    DEFAULT_STEPS: int | None = None
    DEFAULT_GUIDANCE_SCALE: float | None = None
    DEFAULT_FPS: int | None = None

    @field_validator("API_KEYS", "ADMIN_API_KEYS")
    @classmethod
    def _strip_keys(cls, value: str) -> str:
        return ",".join(k.strip() for k in value.split(",") if k.strip())

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted bearer keys of ordinary users; with `admin_api_keys` empty, authentication
        is off."""
        return tuple(k for k in self.API_KEYS.split(",") if k)

    @property
    def admin_api_keys(self) -> tuple[str, ...]:
        """The bearer keys that see every job."""
        return tuple(k for k in self.ADMIN_API_KEYS.split(",") if k)

    @property
    def max_body_bytes(self) -> int:
        """Largest body read: the fields plus one image (base64 in JSON takes 4/3 of it)."""
        return self.MAX_BODY_BYTES + self.MAX_IMAGE_BYTES * 4 // 3 + 1024

    def limits_for(self, spec: ModelSpec) -> Limits:
        """Request limits and defaults for one model: the model's own (registry), under this
        service's maxima; `DEFAULT_*` settings, when set, override the model's defaults."""
        overrides = {
            name: value
            for name, value in (
                ("default_num_frames", self.DEFAULT_NUM_FRAMES),
                ("default_width", self.DEFAULT_WIDTH),
                ("default_height", self.DEFAULT_HEIGHT),
                ("default_steps", self.DEFAULT_STEPS),
                ("default_guidance_scale", self.DEFAULT_GUIDANCE_SCALE),
                ("default_fps", self.DEFAULT_FPS),
            )
            if value is not None
        }
        return Limits.for_model(
            spec,
            max_prompt_chars=self.MAX_PROMPT_CHARS,
            min_num_frames=self.MIN_NUM_FRAMES,
            max_num_frames=self.MAX_NUM_FRAMES,
            min_side_px=self.MIN_SIDE_PX,
            max_side_px=self.MAX_SIDE_PX,
            max_pixels=self.MAX_PIXELS,
            max_steps=self.MAX_STEPS,
            max_guidance_scale=self.MAX_GUIDANCE_SCALE,
            max_fps=self.MAX_FPS,
            **overrides,
        )

    def open_storage(self) -> Storage:
        """The results storage `STORAGE_URL` names (the folder `DATA_DIR` when unset)."""
        return open_storage(
            self.STORAGE_URL,
            self.DATA_DIR,
            public_endpoint_url=self.STORAGE_PUBLIC_ENDPOINT_URL or None,
        )

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files live. `job_id` must be a server-made id."""
        return job_dir(self.DATA_DIR, job_id)


@lru_cache(maxsize=1)
def get_settings() -> ServiceSettings:
    """The process's settings, read from the environment once."""
    return ServiceSettings()
