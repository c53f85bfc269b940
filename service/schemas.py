"""Request and response models shared by the API and the worker (pydantic only, never torch).

- `GenerateRequest`: a generation request, validated against `Limits` and completed with defaults,
  so the payload a worker receives has every field set.

  ```python
  req = GenerateRequest.model_validate(body, context={"limits": settings.limits()})
  req = GenerateRequest.model_validate(payload)   # limits from this process's environment
  payload = make_payload(job_id, req)             # what is enqueued: request + "job_id"
  job_id, req = split_payload(payload)            # the worker's side
  ```

- `JobStatus` (`queued|in_progress|completed|failed|cancelled`) and `Stage`
  (`queued|denoising|decoding|encoding|done`), the job lifecycle; `openai_status` maps it to the
  OpenAI Videos view (cancelled -> failed with `error.code = "cancelled"`).
- `ErrorCode`: the codes that jobs and API errors carry.
- Response objects: `JobObject` (native `/jobs`), `VideoObject` (`/v1/videos`), `ErrorBody`.

Validation messages name the bad value and what is allowed; the HTTP layer returns them as 4xx.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

from .settings import Limits, get_settings

SELECT_MODES = ("topk", "threshold_query", "threshold_global")  # as vmoba.config.SELECT_MODES
ATTENTION_BACKENDS = ("vmoba", "dense")
# One value per layer kind (1d, 2d, 3d): vmoba.config.VMoBAConfig's default `topk`.
DEFAULT_TOPK = (2, 6, 18)
MAX_SEED = 2**63 - 1
# Largest latent chunk accepted (a 1920 px side is 120 latent units).
MAX_CHUNK = 1024


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
    internal_error = "internal_error"


def openai_status(status: JobStatus | str) -> str:
    """The OpenAI Videos status of a job: `cancelled` shows as `failed` (error code `cancelled`)."""
    status = JobStatus(status)
    return JobStatus.failed.value if status is JobStatus.cancelled else status.value


# -- lenient-but-honest scalars ---------------------------------------------------------------
# Multipart forms carry every value as a string ("17"), so numeric strings are accepted; booleans,
# fractional "integers", NaN and infinities are not.

_INT_RE = re.compile(r"\s*[+-]?\d{1,30}\s*")
_FLOAT_RE = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, got the boolean {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"must be a whole number, got {value!r}")
    if isinstance(value, str) and _INT_RE.fullmatch(value):
        return int(value)
    raise ValueError(f"must be an integer, got {value!r}")


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got the boolean {value!r}")
    if isinstance(value, (int, float)):
        value = float(value)
    elif isinstance(value, str) and _FLOAT_RE.fullmatch(value):
        value = float(value)
    else:
        raise ValueError(f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_to_int)]
Float = Annotated[float, BeforeValidator(_to_float)]


def _to_topk(value: Any) -> Any:
    if isinstance(value, str) and "," in value:  # "2,6,18" from a form field
        value = [v for v in value.split(",")]
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError(
                f"must be one integer or three (for 1d, 2d, 3d layers), got {len(value)} values"
            )
        return tuple(_to_int(v) for v in value)
    return _to_int(value)


def _to_ints(n: int):
    """Before-validator for `n` integers (one int when `n == 1`); "5,13" strings allowed."""

    def convert(value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            value = value.split(",")
        if n == 1:
            return _to_int(value)
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"must be {n} integers, got {value!r}")
        return tuple(_to_int(v) for v in value)

    return convert


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    limits = ctx.get("limits")
    return limits if limits is not None else get_settings().limits()


class AttentionRequest(BaseModel):
    """Per-request attention settings (the VMoBA knobs; see ../shared/design/vmoba.md).

    - `backend`: `"vmoba"` (sparse) or `"dense"` (stock attention).
    - `select`: `"threshold_global"` (the paper's), `"threshold_query"` or `"topk"`.
    - `threshold`: `tau` in [0, 1] for the threshold modes.
    - `topk`: blocks per query (self included) for `"topk"`: one int, or three for (1d, 2d, 3d).
    - `dense_steps`: fraction in [0, 1] of the first denoising steps run dense.
    - `temporal_chunk`, `spatial_chunk` `(ch, cw)`, `st_chunk` `(ct, ch, cw)`: latent block sizes;
      omitted (null) means chosen for the video's grid (`vmoba.VMoBAConfig.for_grid`).
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["vmoba", "dense"] = "vmoba"
    select: Literal["topk", "threshold_query", "threshold_global"] = "threshold_global"
    threshold: Float = Field(0.25, ge=0.0, le=1.0)
    topk: Annotated[Union[int, tuple[int, int, int]], BeforeValidator(_to_topk)] = DEFAULT_TOPK
    dense_steps: Float = Field(0.25, ge=0.0, le=1.0)
    temporal_chunk: Optional[Annotated[int, BeforeValidator(_to_ints(1))]] = None
    spatial_chunk: Optional[Annotated[tuple[int, int], BeforeValidator(_to_ints(2))]] = None
    st_chunk: Optional[Annotated[tuple[int, int, int], BeforeValidator(_to_ints(3))]] = None

    @model_validator(mode="after")
    def _check_sizes(self, info: ValidationInfo) -> "AttentionRequest":
        limit = _limits(info).max_topk
        values = (self.topk,) if isinstance(self.topk, int) else self.topk
        for v in values:
            if not 1 <= v <= limit:
                raise ValueError(f"attention.topk values must be in [1, {limit}], got {self.topk!r}")
        for name in ("temporal_chunk", "spatial_chunk", "st_chunk"):
            value = getattr(self, name)
            values = () if value is None else (value,) if isinstance(value, int) else value
            if any(not 1 <= v <= MAX_CHUNK for v in values):
                raise ValueError(f"attention.{name} values must be in [1, {MAX_CHUNK}] (latent "
                                 f"units), got {value!r}")
        return self


class GenerateRequest(BaseModel):
    """A text-to-video request. Omitted fields get the model's defaults during validation.

    Checks (limits from `Limits`): prompt non-blank and at most `max_prompt_chars`; `num_frames`
    of the form 4k+1 in [min, max]; `width`/`height` multiples of 16 in [min_side, max_side] with
    `width*height <= max_pixels`; steps in [1, max_steps]; guidance in [0, max_guidance_scale];
    fps in [1, max_fps]; seed in [0, 2**63-1] or omitted (the API resolves it before enqueuing).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str = ""
    seed: Optional[Int] = None
    num_frames: Optional[Int] = None
    width: Optional[Int] = None
    height: Optional[Int] = None
    num_inference_steps: Optional[Int] = None
    guidance_scale: Optional[Float] = None
    fps: Optional[Int] = None
    attention: AttentionRequest = Field(default_factory=AttentionRequest)

    @model_validator(mode="after")
    def _complete_and_check(self, info: ValidationInfo) -> "GenerateRequest":
        lim = _limits(info)
        # Defaults first, so that defaults are checked like given values.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.num_frames is None:
            set_("num_frames", lim.default_num_frames)
        if self.width is None:
            set_("width", lim.default_width)
        if self.height is None:
            set_("height", lim.default_height)
        if self.num_inference_steps is None:
            set_("num_inference_steps", lim.default_steps)
        if self.guidance_scale is None:
            set_("guidance_scale", lim.default_guidance_scale)
        if self.fps is None:
            set_("fps", lim.default_fps)

        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if len(self.prompt) > lim.max_prompt_chars:
            raise ValueError(
                f"prompt has {len(self.prompt)} characters; at most {lim.max_prompt_chars} allowed"
            )
        if len(self.negative_prompt) > lim.max_prompt_chars:
            raise ValueError(
                f"negative_prompt has {len(self.negative_prompt)} characters; "
                f"at most {lim.max_prompt_chars} allowed"
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63-1], got {self.seed}")
        n = self.num_frames
        if (n - 1) % 4 or not lim.min_num_frames <= n <= lim.max_num_frames:
            examples = ", ".join(str(4 * k + 1) for k in (4, 8, 12, 16, 20))
            raise ValueError(
                f"num_frames must be of the form 4k+1 (e.g. {examples}) in "
                f"[{lim.min_num_frames}, {lim.max_num_frames}], got {n}"
            )
        for name in ("width", "height"):
            v = getattr(self, name)
            if v % 16 or not lim.min_side_px <= v <= lim.max_side_px:
                raise ValueError(
                    f"{name} must be a multiple of 16 in [{lim.min_side_px}, {lim.max_side_px}], "
                    f"got {v}"
                )
        if self.width * self.height > lim.max_pixels:
            raise ValueError(
                f"size {self.width}x{self.height} has {self.width * self.height} pixels; "
                f"at most {lim.max_pixels} allowed (e.g. 1280x720)"
            )
        if not 1 <= self.num_inference_steps <= lim.max_steps:
            raise ValueError(
                f"num_inference_steps must be in [1, {lim.max_steps}], "
                f"got {self.num_inference_steps}"
            )
        if not 0.0 <= self.guidance_scale <= lim.max_guidance_scale:
            raise ValueError(
                f"guidance_scale must be in [0, {lim.max_guidance_scale:g}], "
                f"got {self.guidance_scale:g}"
            )
        if not 1 <= self.fps <= lim.max_fps:
            raise ValueError(f"fps must be in [1, {lim.max_fps}], got {self.fps}")
        return self

    @property
    def size(self) -> str:
        """`"WxH"`, as the OpenAI format writes it."""
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        """Clip length in seconds as a string, `(num_frames - 1) / fps` (65 frames at 16 fps: "4")."""
        return format_seconds((self.num_frames - 1) / self.fps)


def make_payload(job_id: str, request: "GenerateRequest") -> dict:
    """The one JSON-able argument of `worker.jobs.generate_video`: the request plus `job_id`."""
    return {**request.model_dump(mode="json"), "job_id": job_id}


def split_payload(payload: dict, limits: Optional[Limits] = None) -> tuple[str, "GenerateRequest"]:
    """`(job_id, request)` from an enqueued payload, the request validated again (limits from
    `limits`, else from this process's environment). Raises `ValueError` (a pydantic
    `ValidationError` for the request) when the payload is malformed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("job_id"), str):
        raise ValueError(f"payload must be a dict with a 'job_id' string, got {payload!r:.200}")
    body = {k: v for k, v in payload.items() if k != "job_id"}
    ctx = {"limits": limits} if limits is not None else None
    return payload["job_id"], GenerateRequest.model_validate(body, context=ctx)


def format_seconds(value: float) -> str:
    """`4.0 -> "4"`, `1.0625 -> "1.06"`."""
    return f"{round(value, 2):g}"


def frames_for_seconds(seconds: float, fps: int) -> int:
    """Frames for a clip of `seconds` at `fps`, rounded to the nearest 4k+1 (4 s at 16 fps: 65)."""
    return 4 * max(1, round(seconds * fps / 4)) + 1


class VideoCreateForm(BaseModel):
    """`POST /v1/videos` fields (documentation only: the route converts them, see
    `routes.openai.from_openai`). Form values are strings; `attention` may be JSON or
    `attention[backend]=...` keys."""

    prompt: str
    model: Optional[str] = Field(None, description="must be the served model, or omitted")
    seconds: Optional[str] = Field(None, description='clip length, e.g. "4" (16 fps: 65 frames)')
    size: Optional[str] = Field(None, description='"WIDTHxHEIGHT", multiples of 16')
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    num_frames: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    fps: Optional[int] = None
    attention: Optional[AttentionRequest] = None


def _inline_refs(schema: dict) -> dict:
    """A JSON schema with its `$defs` references inlined (for OpenAPI `openapi_extra`)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def request_body(content: dict) -> dict:
    """`openapi_extra` documenting a body the route reads itself: `{media type: model}`."""
    return {"requestBody": {"required": True, "content": {
        media: {"schema": _inline_refs(model.model_json_schema())}
        for media, model in content.items()}}}


# -- response objects --------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    """The error envelope of every non-2xx answer (OpenAI's): `{"error": {...}}`."""

    error: ErrorDetail


class JobError(BaseModel):
    code: str
    message: str


class JobObject(BaseModel):
    """A job as the native API shows it (`GET /jobs/{id}`)."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    stage: Stage
    progress: int = Field(ge=0, le=100)
    step: int = 0
    total_steps: int = 0
    queue_position: Optional[int] = None
    model: str
    model_note: Optional[str] = None
    request: dict
    seed: Optional[int] = None
    created_at: int
    started_at: Optional[int] = None
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    timings: dict = Field(default_factory=dict)
    density: Optional[float] = None
    error: Optional[JobError] = None
    cancel_requested: bool = False
    attempts: int = 0
    worker: Optional[str] = None
    urls: dict = Field(default_factory=dict)


class VideoObject(BaseModel):
    """A job in the OpenAI Videos format (`GET /v1/videos/{id}`), plus our extra fields."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    model: str
    prompt: Optional[str] = None
    seconds: str
    size: str
    error: Optional[JobError] = None
    remixed_from_video_id: Optional[str] = None
    # Extras (clients ignore them).
    model_note: Optional[str] = None
    seed: Optional[int] = None
    queue_position: Optional[int] = None
    num_frames: Optional[int] = None
    fps: Optional[int] = None
    attention: Optional[dict] = None
    density: Optional[float] = None
    timings: dict = Field(default_factory=dict)
