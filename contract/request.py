"""The generation request: its parsing and limits (the API) and the frozen validated form that is
enqueued (what the worker decodes and trusts).

```python
raw = GenerateRequest.model_validate(body, context={"limits": limits})   # 4xx on failure
job = raw.validated(seed=new_seed(), model=spec.id)   # frozen, nothing left to default
payload = job.to_payload(job_id)               # what RQ carries to `worker.jobs.generate_video`
job_id, job = ValidatedRequest.from_payload(payload)                # the worker's side
```

Attention settings are the exception to "nothing optional": a request carries only the VMoBA
fields its caller set (`ValidatedRequest.attention`), and the worker merges model defaults <
operator defaults (`ATTENTION_DEFAULTS`) < request into one `vmoba.AttentionSettings`. The
choices below mirror `vmoba.config` (a test keeps them equal; this package never imports torch).

Validation messages name the bad value and what is allowed; the HTTP layer returns them as 4xx.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .models import ModelSpec

# The same choices as vmoba.config.ATTENTION_BACKENDS / SELECT_MODES (tests/test_contract.py).
ATTENTION_BACKENDS = ("vmoba", "dense")
SELECT_MODES = ("topk", "threshold_query", "threshold_global")
MAX_SEED = 2**63 - 1
# Largest latent chunk accepted (a 1920 px side is 120 latent units).
MAX_CHUNK = 1024
MAX_FLOW_SHIFT = 20.0
TINY_MODEL = "tiny"


class Limits(BaseModel):
    """What a request to one model may ask for, and the values used for fields it omits (built by
    the API from its settings and the model's registry entry, `ServiceSettings.limits_for`)."""

    model: str = "tiny-wan2.1-t2v"
    tasks: tuple[str, ...] = ("t2v",)
    max_prompt_chars: int = 2000
    min_num_frames: int = 5
    max_num_frames: int = 129
    min_side_px: int = 32
    max_side_px: int = 1920
    max_pixels: int = 1280 * 720
    max_steps: int = 100
    max_guidance_scale: float = 20.0
    max_fps: int = 60
    max_topk: int = 1024
    size_multiple: int = 16  # VAE spatial compression x patch
    default_num_frames: int = 17
    default_width: int = 128
    default_height: int = 128
    default_steps: int = 4
    default_guidance_scale: float = 5.0
    default_fps: int = 16
    default_negative_prompt: str = ""
    # Wan's UniPC flow shift below 720p and from 720p up (by pixel count).
    flow_shift_480p: float = 3.0
    flow_shift_720p: float = 5.0

    def default_flow_shift(self, width: int, height: int) -> float:
        return self.flow_shift_720p if width * height >= 1280 * 720 else self.flow_shift_480p

    @classmethod
    def for_model(cls, spec: ModelSpec, **service_limits: Any) -> Limits:
        """The limits of `spec`: its defaults and own maxima, under the service's maxima."""
        d = spec.defaults
        out = cls(
            model=spec.id,
            tasks=spec.tasks,
            size_multiple=spec.size_multiple,
            default_num_frames=d.num_frames,
            default_width=d.width,
            default_height=d.height,
            default_steps=d.num_inference_steps,
            default_guidance_scale=d.guidance_scale,
            default_fps=d.fps,
            default_negative_prompt=d.negative_prompt,
            flow_shift_480p=d.flow_shift_480p,
            flow_shift_720p=d.flow_shift_720p,
        )
        out = out.model_copy(update=service_limits)
        return out.model_copy(
            update={
                "max_num_frames": min(out.max_num_frames, spec.max_num_frames),
                "max_pixels": min(out.max_pixels, spec.max_pixels),
            }
        )


# -- lenient-but-honest scalars ---------------------------------------------------------------
# Multipart forms carry every value as a string ("17"), so numeric strings are accepted; booleans,
# fractional "integers", NaN and infinities are not.

_INT_RE = re.compile(r"\s*[+-]?\d{1,30}\s*")
_FLOAT_RE = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def to_int(value: Any) -> Any:
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


def to_float(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got the boolean {value!r}")
    if isinstance(value, (int, float)) or isinstance(value, str) and _FLOAT_RE.fullmatch(value):
        value = float(value)
    else:
        raise ValueError(f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(to_int)]
Float = Annotated[float, BeforeValidator(to_float)]


def _to_topk(value: Any) -> Any:
    if isinstance(value, str) and "," in value:  # "2,6,18" from a form field
        value = value.split(",")
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError(
                f"must be one integer or three (for 1d, 2d, 3d layers), got {len(value)} values"
            )
        return tuple(to_int(v) for v in value)
    return to_int(value)


def _to_ints(n: int) -> Any:
    """Before-validator for `n` integers (one int when `n == 1`); "5,13" strings allowed."""

    def convert(value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            value = value.split(",")
        if n == 1:
            return to_int(value)
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"must be {n} integers, got {value!r}")
        return tuple(to_int(v) for v in value)

    return convert


def _limits(info: ValidationInfo) -> Limits:
    """The limits given as validation context (`{"limits": ...}`), else the default `Limits()`."""
    limits = (info.context or {}).get("limits")
    return limits if limits is not None else Limits()


Topk = Annotated[Union[int, tuple[int, int, int]], BeforeValidator(_to_topk)]


class AttentionRequest(BaseModel):
    """The VMoBA knobs a caller may set; an omitted field takes the model's default (after the
    operator's `ATTENTION_DEFAULTS`), as `GET /models` shows.

    - `backend`: `"vmoba"` (sparse) or `"dense"` (stock attention).
    - `select`: `"topk"`, `"threshold_query"` or `"threshold_global"`.
    - `threshold`: `tau` in [0, 1] for the threshold modes.
    - `topk`: blocks per query (self included) for `"topk"`: one int, or three for (1d, 2d, 3d).
    - `dense_steps`: fraction in [0, 1] of the first denoising steps run dense.
    - `temporal_chunk`, `spatial_chunk` `(ch, cw)`, `st_chunk` `(ct, ch, cw)`: latent block sizes;
      omitted means chosen for the video's grid.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Optional[Literal["vmoba", "dense"]] = None
    select: Optional[Literal["topk", "threshold_query", "threshold_global"]] = None
    threshold: Optional[Float] = Field(None, ge=0.0, le=1.0)
    topk: Optional[Topk] = None
    dense_steps: Optional[Float] = Field(None, ge=0.0, le=1.0)
    temporal_chunk: Optional[Annotated[int, BeforeValidator(_to_ints(1))]] = None
    spatial_chunk: Optional[Annotated[tuple[int, int], BeforeValidator(_to_ints(2))]] = None
    st_chunk: Optional[Annotated[tuple[int, int, int], BeforeValidator(_to_ints(3))]] = None

    @model_validator(mode="after")
    def _check_sizes(self, info: ValidationInfo) -> AttentionRequest:
        limit = _limits(info).max_topk
        if self.topk is not None:
            topk: tuple[int, ...] = (self.topk,) if isinstance(self.topk, int) else self.topk
            if any(not 1 <= v <= limit for v in topk):
                raise ValueError(
                    f"attention.topk values must be in [1, {limit}], got {self.topk!r}"
                )
        for name in ("temporal_chunk", "spatial_chunk", "st_chunk"):
            value = getattr(self, name)
            values = () if value is None else (value,) if isinstance(value, int) else value
            if any(not 1 <= v <= MAX_CHUNK for v in values):
                raise ValueError(
                    f"attention.{name} values must be in [1, {MAX_CHUNK}] (latent "
                    f"units), got {value!r}"
                )
        return self

    def overrides(self) -> dict:
        """The fields the caller set, JSON form (what the job carries to the worker)."""
        return self.model_dump(mode="json", exclude_none=True)


# What the spec says of a prompt ("not blank"); the validator below gives the message.
# (Python's str.strip also takes \x1c-\x1f and \x85, which a JSON Schema regex's \s does not.)
PROMPT_PATTERN = r"[^\s\x1c-\x1f\x85]"


class GenerateRequest(BaseModel):
    """A generation request as received. Omitted fields get the model's defaults in `validated`.

    Checks (limits from `Limits`): prompt non-blank and at most `max_prompt_chars`; `num_frames`
    of the form 4k+1 in [min, max]; `width`/`height` multiples of 16 in [min_side, max_side] with
    `width*height <= max_pixels`; steps in [1, max_steps]; guidance in [0, max_guidance_scale];
    fps in [1, max_fps]; `flow_shift` in (0, 20]; seed in [0, 2**63-1] or omitted (the API resolves
    it before enqueuing).
    """

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(
        None, description="a served model (GET /models); omitted: the deployment's default"
    )
    prompt: str = Field(json_schema_extra={"minLength": 1, "pattern": PROMPT_PATTERN})
    negative_prompt: Optional[str] = None
    seed: Optional[Int] = None
    num_frames: Optional[Int] = None
    width: Optional[Int] = None
    height: Optional[Int] = None
    num_inference_steps: Optional[Int] = None
    guidance_scale: Optional[Float] = None
    fps: Optional[Int] = None
    flow_shift: Optional[Float] = Field(
        None, description="UniPC flow shift; default 3.0 below 720p, 5.0 from 720p (Wan's)"
    )
    attention: AttentionRequest = Field(default_factory=AttentionRequest)

    @field_validator("attention", mode="before")
    @classmethod
    def _null_attention_is_the_default(cls, value):
        # `"attention": null` means what leaving it out means, like every other optional field.
        return AttentionRequest() if value is None else value

    @model_validator(mode="after")
    def _complete_and_check(self, info: ValidationInfo) -> GenerateRequest:
        lim = _limits(info)
        # Defaults first, so that defaults are checked like given values.
        n = lim.default_num_frames if self.num_frames is None else self.num_frames
        width = lim.default_width if self.width is None else self.width
        height = lim.default_height if self.height is None else self.height
        steps = lim.default_steps if self.num_inference_steps is None else self.num_inference_steps
        guidance = (
            lim.default_guidance_scale if self.guidance_scale is None else self.guidance_scale
        )
        fps = lim.default_fps if self.fps is None else self.fps
        shift = (
            lim.default_flow_shift(width, height) if self.flow_shift is None else self.flow_shift
        )
        negative = (
            lim.default_negative_prompt if self.negative_prompt is None else self.negative_prompt
        )
        for name, value in (
            ("negative_prompt", negative),
            ("num_frames", n),
            ("width", width),
            ("height", height),
            ("num_inference_steps", steps),
            ("guidance_scale", guidance),
            ("fps", fps),
            ("flow_shift", shift),
        ):
            object.__setattr__(self, name, value)

        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        for name, text in (("prompt", self.prompt), ("negative_prompt", negative)):
            n_chars = len(text)
            if n_chars > lim.max_prompt_chars:
                raise ValueError(
                    f"{name} has {n_chars} characters; at most {lim.max_prompt_chars} allowed"
                )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63-1], got {self.seed}")
        if (n - 1) % 4 or not lim.min_num_frames <= n <= lim.max_num_frames:
            examples = ", ".join(str(4 * k + 1) for k in (4, 8, 12, 16, 20))
            raise ValueError(
                f"num_frames must be of the form 4k+1 (e.g. {examples}) in "
                f"[{lim.min_num_frames}, {lim.max_num_frames}], got {n}"
            )
        for name, v in (("width", width), ("height", height)):
            if v % lim.size_multiple or not lim.min_side_px <= v <= lim.max_side_px:
                raise ValueError(
                    f"{name} must be a multiple of {lim.size_multiple} in [{lim.min_side_px}, "
                    f"{lim.max_side_px}] for {lim.model}, got {v}"
                )
        if width * height > lim.max_pixels:
            raise ValueError(
                f"size {width}x{height} has {width * height} pixels; "
                f"at most {lim.max_pixels} allowed for {lim.model}"
            )
        if not 1 <= steps <= lim.max_steps:
            raise ValueError(f"num_inference_steps must be in [1, {lim.max_steps}], got {steps}")
        if not 0.0 <= guidance <= lim.max_guidance_scale:
            raise ValueError(
                f"guidance_scale must be in [0, {lim.max_guidance_scale:g}], got {guidance:g}"
            )
        if not 1 <= fps <= lim.max_fps:
            raise ValueError(f"fps must be in [1, {lim.max_fps}], got {fps}")
        if not 0.0 < shift <= MAX_FLOW_SHIFT:
            raise ValueError(f"flow_shift must be in (0, {MAX_FLOW_SHIFT:g}], got {shift:g}")
        return self

    def validated(
        self, *, seed: int, model: str, task: Literal["t2v", "i2v"] = "t2v"
    ) -> ValidatedRequest:
        """The frozen request to enqueue for `model` (a registry id); `seed` is used when the
        request gave none."""
        assert self.negative_prompt is not None
        assert self.num_frames is not None and self.width is not None and self.height is not None
        assert self.num_inference_steps is not None and self.guidance_scale is not None
        assert self.fps is not None and self.flow_shift is not None
        return ValidatedRequest(
            model=model,
            task=task,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed if self.seed is not None else seed,
            num_frames=self.num_frames,
            width=self.width,
            height=self.height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            fps=self.fps,
            flow_shift=self.flow_shift,
            attention=self.attention.overrides(),
        )


class ValidatedRequest(BaseModel):
    """A request checked against the API's limits with every default resolved. Frozen; the worker
    decodes it from the payload and trusts it (it never re-checks the API's limits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    task: Literal["t2v", "i2v"] = "t2v"  # i2v: the input image is stored with the job
    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    flow_shift: float
    attention: dict = Field(default_factory=dict)  # only the fields the caller set

    @property
    def size(self) -> str:
        """`"WxH"`, as the OpenAI format writes it."""
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        """Clip length in seconds as a string, `(num_frames - 1) / fps` (65 frames at 16 fps: "4")."""
        return format_seconds((self.num_frames - 1) / self.fps)

    def to_payload(self, job_id: str) -> dict:
        """The one JSON-able argument of the job function: the request plus `job_id`."""
        return {**self.model_dump(mode="json"), "job_id": job_id}

    @classmethod
    def from_payload(cls, payload: Any) -> tuple[str, ValidatedRequest]:
        """`(job_id, request)` from an enqueued payload. `ValueError` (a pydantic
        `ValidationError` for the request) when the payload is malformed."""
        if not isinstance(payload, dict) or not isinstance(payload.get("job_id"), str):
            raise ValueError(f"payload must be a dict with a 'job_id' string, got {payload!r:.200}")
        body = {k: v for k, v in payload.items() if k != "job_id"}
        return payload["job_id"], cls.model_validate(body)


def format_seconds(value: float) -> str:
    """`4.0 -> "4"`, `1.0625 -> "1.06"`."""
    return f"{round(value, 2):g}"


def frames_for_seconds(seconds: float, fps: int) -> int:
    """Frames for a clip of `seconds` at `fps`, rounded to the nearest 4k+1 (4 s at 16 fps: 65)."""
    return 4 * max(1, round(seconds * fps / 4)) + 1
