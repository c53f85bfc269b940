"""The OpenAI Videos wire format under `/v1/videos` (what `openai.OpenAI().videos` speaks).

`POST /v1/videos` takes multipart/form-data (the client sends every value as a string), urlencoded
or JSON, with OpenAI's fields `prompt`, `model`, `seconds`, `size` ("WxH") plus ours
(`negative_prompt`, `seed`, `num_frames`, `width`, `height`, `num_inference_steps`,
`guidance_scale`, `fps`, `attention`). `seconds` maps to frames at the request's fps (default 16),
rounded to 4k+1 (4 s -> 65 frames). Cancelled jobs show as `failed` with `error.code="cancelled"`.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from fastapi import APIRouter, Query, Request

from contract.files import THUMBNAIL_FILE, VIDEO_FILE
from contract.request import Limits, frames_for_seconds, to_float, to_int

from ..auth import principal_of
from ..errors import APIError
from ..responses import JSON
from ..schemas import ErrorBody, VideoCreateForm, VideoObject, request_body
from ..state import get_state
from ..submit import resolve_model, validate_request
from ..views import video_view
from . import common

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorBody} for c in (400, 401, 404, 409, 413, 415, 429)
}
SIZE_RE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")


def from_openai(lim: Limits, body: dict) -> dict:
    """OpenAI create fields -> `GenerateRequest` fields (`size` -> width/height, `seconds` ->
    num_frames at the model's fps), with `lim` the limits of the model the body names."""
    body = dict(body)
    size = body.pop("size", None)
    if size is not None:
        if "width" in body or "height" in body:
            raise APIError(400, "give either size or width/height, not both", param="size")
        m = SIZE_RE.fullmatch(str(size))
        if not m:
            raise APIError(
                400,
                f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '832x480'), got {str(size)[:40]!r}",
                param="size",
            )
        body["width"], body["height"] = int(m.group(1)), int(m.group(2))
    seconds = body.pop("seconds", None)
    if seconds is not None:
        if "num_frames" in body:
            raise APIError(400, "give either seconds or num_frames, not both", param="seconds")
        try:
            value = to_float(seconds)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise APIError(
                400,
                f'seconds must be a positive number (e.g. "4"), got {str(seconds)[:40]!r}',
                param="seconds",
            )
        try:
            fps = to_int(body.get("fps", lim.default_fps))
        except ValueError:
            fps = lim.default_fps  # the fps error itself is reported by validation
        fps = max(1, fps)
        frames = frames_for_seconds(value, fps) if value < 1e6 else 10**9
        if not lim.min_num_frames <= frames <= lim.max_num_frames:
            raise APIError(
                400,
                f"seconds={seconds} means {frames} frames at {fps} fps; "
                f"{lim.min_num_frames} to {lim.max_num_frames} frames "
                f"({(lim.min_num_frames - 1) / fps:g} to "
                f"{(lim.max_num_frames - 1) / fps:g} s) allowed",
                param="seconds",
            )
        body["num_frames"] = frames
    return body


@router.post(
    "/videos",
    response_model=VideoObject,
    responses=ERRORS,
    openapi_extra=request_body(
        {"multipart/form-data": VideoCreateForm, "application/json": VideoCreateForm}
    ),
)
async def create_video(request: Request):
    """Create a video job (multipart, urlencoded or JSON)."""
    state = get_state(request)
    body = await common.read_request_body(state, request)
    spec = await resolve_model(state, body.get("model"))
    body = {**from_openai(state.limits(spec), body), "model": spec.id}
    rec, pos, headers, warning = await common.submit_job(
        state, request, await validate_request(state, body), "/v1/videos/"
    )
    return JSON(common.with_warning(video_view(rec, pos), warning), headers=headers)


@router.get("/videos", responses=ERRORS)
async def list_videos(
    request: Request,
    limit: int = Query(20, json_schema_extra=common.LIMIT_SCHEMA),
    order: str = Query("desc", json_schema_extra=common.ORDER_SCHEMA),
    after: Optional[str] = Query(None, json_schema_extra=common.AFTER_SCHEMA),
):
    """Cursor list: `{object: "list", data, first_id, last_id, has_more}`."""
    state = get_state(request)
    page = await common.list_page(state, limit, order, after, video_view, principal_of(request))
    return JSON(page, headers=common.poll_headers(state))


@router.get("/videos/{video_id}", response_model=VideoObject, responses=ERRORS)
async def retrieve_video(request: Request, video_id: str):
    state = get_state(request)
    rec, pos, _ = await common.load(state, video_id, principal_of(request))
    return JSON(video_view(rec, pos), headers=common.poll_headers(state))


@router.get("/videos/{video_id}/content", responses=ERRORS)
@router.head("/videos/{video_id}/content", include_in_schema=False)
async def video_content(
    request: Request,
    video_id: str,
    variant: str = Query("video", json_schema_extra={"enum": ["video", "thumbnail"]}),
):
    """The mp4 (`variant=video`, HTTP Range supported) or the JPEG thumbnail."""
    state = get_state(request)
    if variant == "video":
        return await common.file_response(
            state, request, video_id, VIDEO_FILE, "video/mp4", f"{video_id}.mp4"
        )
    if variant == "thumbnail":
        return await common.file_response(state, request, video_id, THUMBNAIL_FILE, "image/jpeg")
    raise APIError(
        400,
        f"variant must be 'video' or 'thumbnail' (no spritesheets here), got {variant[:40]!r}",
        param="variant",
    )


@router.delete("/videos/{video_id}", responses=ERRORS)
async def delete_video(request: Request, video_id: str):
    """`{"id", "object": "video.deleted", "deleted": true}`."""
    await common.delete(get_state(request), video_id, principal_of(request))
    return common.deleted_response(video_id, "video.deleted")
