"""HTTP-only models: the response objects (`JobObject` for `/jobs`, `VideoObject` for `/v1/videos`,
`ErrorBody`) and the OpenAPI documentation of bodies the routes read themselves. The request model
and the job lifecycle live in `contract`.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from contract.request import PROMPT_PATTERN, AttentionRequest
from contract.status import JobStatus, Stage


class VideoCreateForm(BaseModel):
    """`POST /v1/videos` fields (documentation only: the route converts them, see
    `routes.openai.from_openai`). Form values are strings; `attention` may be JSON or
    `attention[backend]=...` keys."""

    prompt: str = Field(json_schema_extra={"minLength": 1, "pattern": PROMPT_PATTERN})
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
    flow_shift: Optional[float] = None
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


def _without_null(schema: dict) -> dict:
    """A form's fields: a form cannot send null (a field is left out instead), so
    `anyOf: [X, null]` becomes `X` in each property."""
    props = {}
    for name, prop in schema.get("properties", {}).items():
        options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            prop = {
                **{k: v for k, v in prop.items() if k not in ("anyOf", "default")},
                **options[0],
            }
        props[name] = prop
    return {**schema, "properties": props}


FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def request_body(content: dict) -> dict:
    """`openapi_extra` documenting a body the route reads itself: `{media type: model}`."""
    schemas = {}
    for media, model in content.items():
        schema = _inline_refs(model.model_json_schema())
        schemas[media] = {"schema": _without_null(schema) if media in FORM_MEDIA_TYPES else schema}
    return {"requestBody": {"required": True, "content": schemas}}


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
    attention: Optional[dict] = None  # {"settings": ..., "sources": ...} once the job ran
    density: Optional[float] = None
    error: Optional[JobError] = None
    cancel_requested: bool = False
    warning: Optional[str] = None  # on create: no live worker serves the model yet
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
    attention_sources: Optional[dict] = None
    density: Optional[float] = None
    timings: dict = Field(default_factory=dict)
