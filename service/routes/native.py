"""The native routes: `POST /generate` and `/jobs` (status, list, events, files, cancel, delete)."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from contract.files import THUMBNAIL_FILE, VIDEO_FILE
from contract.request import GenerateRequest

from ..auth import principal_of
from ..errors import APIError
from ..responses import JSON
from ..schemas import ErrorBody, JobObject, request_body
from ..sse import job_events
from ..state import get_state
from ..submit import validate_request
from ..views import job_view
from . import common

router = APIRouter(tags=["native"])
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorBody} for c in (400, 401, 404, 409, 413, 429)
}


SSE_CONTENT: dict[str, Any] = {"text/event-stream": {}}  # events: see docs/api.md


@router.post(
    "/generate",
    status_code=202,
    response_model=JobObject,
    responses=ERRORS,
    openapi_extra=request_body(
        {"application/json": GenerateRequest, "multipart/form-data": GenerateRequest}
    ),
)
async def generate(request: Request):
    """Queue a generation job: JSON (`GenerateRequest`; an image-to-video input image as a
    base64 data URL in `image`) or multipart (the image as file field `image`). 202 with the job
    and `Location: /jobs/{id}`; 429 + Retry-After when the queue is full."""
    state = get_state(request)
    body = await common.read_request_body(state, request)
    rec, pos, headers, warning = await common.submit_job(
        state, request, await validate_request(state, body), "/jobs/"
    )
    return JSON(common.with_warning(job_view(rec, pos), warning), status_code=202, headers=headers)


@router.get("/jobs", responses=ERRORS)
async def list_jobs(
    request: Request,
    limit: int = Query(20, json_schema_extra=common.LIMIT_SCHEMA),
    order: str = Query("desc", json_schema_extra=common.ORDER_SCHEMA),
    after: Optional[str] = Query(None, json_schema_extra=common.AFTER_SCHEMA),
):
    """Jobs newest first; page with `after=<last id>` while `has_more`."""
    state = get_state(request)
    page = await common.list_page(state, limit, order, after, job_view, principal_of(request))
    return JSON(page, headers=common.poll_headers(state))


@router.get("/jobs/{job_id}", response_model=JobObject, responses=ERRORS)
async def get_job(request: Request, job_id: str):
    """Status, progress, queue position, seed, timings, density, error, `expires_at`."""
    state = get_state(request)
    rec, pos, cancel = await common.load(state, job_id, principal_of(request))
    return JSON(job_view(rec, pos, cancel_requested=cancel), headers=common.poll_headers(state))


@router.get(
    "/jobs/{job_id}/events",
    responses={**ERRORS, 200: {"description": "Server-Sent Events", "content": SSE_CONTENT}},
)
async def job_events_route(
    request: Request,
    job_id: str,
    last_event_id: Optional[str] = Header(None, json_schema_extra={"pattern": "^[0-9]{1,18}$"}),
):
    """Server-Sent Events: a snapshot, then live progress, until the job ends (see `service.sse`)."""
    state = get_state(request)
    await common.load(state, job_id, principal_of(request))
    resume = None
    if last_event_id is not None:
        try:
            resume = int(last_event_id)
        except ValueError:
            raise APIError(
                400,
                f"Last-Event-ID must be an integer, got {last_event_id[:40]!r}",
                param="Last-Event-ID",
            ) from None
    return StreamingResponse(
        job_events(state, job_id, resume),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/video", responses=ERRORS)
@router.head("/jobs/{job_id}/video", include_in_schema=False)
async def job_video(request: Request, job_id: str):
    """The mp4 (H.264, yuv420p, faststart); HTTP Range gives 206 partial content."""
    return await common.file_response(
        get_state(request), request, job_id, VIDEO_FILE, "video/mp4", f"{job_id}.mp4"
    )


@router.get("/jobs/{job_id}/thumbnail", responses=ERRORS)
@router.head("/jobs/{job_id}/thumbnail", include_in_schema=False)
async def job_thumbnail(request: Request, job_id: str):
    """A JPEG preview frame."""
    return await common.file_response(
        get_state(request), request, job_id, THUMBNAIL_FILE, "image/jpeg"
    )


@router.post("/jobs/{job_id}/cancel", response_model=JobObject, responses=ERRORS)
async def cancel_job(request: Request, job_id: str):
    """Cancel: a waiting job ends at once (200, cancelled); a running one stops at its next step
    (202, `cancel_requested: true`); a finished one is a 409."""
    state = get_state(request)
    rec, pos, flag = await common.cancel(state, job_id, principal_of(request))
    return JSON(
        job_view(rec, pos, cancel_requested=flag), status_code=200 if rec.is_terminal else 202
    )


@router.delete("/jobs/{job_id}", responses=ERRORS)
async def delete_job(request: Request, job_id: str):
    """Delete a waiting or finished job and its files (a running one: cancel it first)."""
    await common.delete(get_state(request), job_id, principal_of(request))
    return common.deleted_response(job_id, "job.deleted")
