"""Handlers shared by the native and OpenAI routes: submit, lookup, cancel, delete, files, listing."""

from __future__ import annotations

from typing import Optional

import anyio
from fastapi import Request
from starlette.responses import Response

from contract.keys import is_job_id
from contract.record import JobRecord
from contract.status import JobStatus

from .. import metrics
from ..auth import Principal, key_of, principal_of
from ..bodies import IMAGE_FIELDS, parse_form_or_json, read_body
from ..downloads import serve_file
from ..errors import APIError, not_found
from ..responses import JSON
from ..state import AppState
from ..submit import Submission, cancel_in_rq, submit

MAX_LIST_LIMIT = 100
# What the list routes accept, for the OpenAPI spec only (the routes check it themselves, with
# their own error messages).
LIMIT_SCHEMA = {"minimum": 1, "maximum": MAX_LIST_LIMIT}
ORDER_SCHEMA = {"enum": ["asc", "desc"]}
AFTER_SCHEMA = {"pattern": "^video_[0-9a-f]{32}$"}


def poll_headers(state: AppState) -> dict:
    return {"openai-poll-after-ms": str(state.settings.POLL_AFTER_MS)}


async def read_request_body(state: AppState, request: Request) -> dict:
    """A create body as a dict (JSON, multipart or urlencoded). Bodies may exceed
    `MAX_BODY_BYTES` only by the image they carry."""
    s = state.settings
    raw = await read_body(request, s.max_body_bytes, s.BODY_TIMEOUT_S)
    too_big = APIError(
        413,
        f"request body has {len(raw)} bytes; at most {s.MAX_BODY_BYTES} "
        "allowed (more only with an image)",
    )
    try:
        body = await parse_form_or_json(request, raw)
    except APIError:
        if len(raw) > s.MAX_BODY_BYTES:
            raise too_big from None
        raise
    if len(raw) > s.MAX_BODY_BYTES and not any(name in body for name in IMAGE_FIELDS):
        raise too_big
    return body


def idempotency(request: Request) -> tuple[Optional[str], str]:
    """`(Idempotency-Key header or None, auth scope)`."""
    return request.headers.get("idempotency-key"), key_of(request.scope)


async def no_worker_warning(state: AppState, model_id: str) -> Optional[str]:
    """A word for the client when no live worker serves the model it asked for: the job is
    queued all the same (docs/api.md says why)."""
    workers = await state.store.live_workers(state.settings.QUEUE_NAME)
    if any(model_id in (w.get("models") or ()) for w in workers):
        return None
    return (
        f"no live worker serves {model_id} right now; the job waits in its queue until one "
        "starts (GET /models shows which models are available)"
    )


def with_warning(body: dict, warning: Optional[str]) -> dict:
    return {**body, "warning": warning} if warning else body


async def submit_job(
    state: AppState, request: Request, sub: Submission, location: str
) -> tuple[JobRecord, Optional[int], dict, Optional[str]]:
    """Queue a validated request (idempotently), count it, and give the response headers
    (`Location: {location}{id}`, plus `Idempotent-Replayed` when an earlier job was returned) and
    a warning when no live worker serves the job's model."""
    key, scope = idempotency(request)
    owner = principal_of(request).owner
    try:
        rec, pos, created = await submit(state, sub, idem_key=key, auth_scope=scope, owner=owner)
    except APIError as e:
        if e.status == 429:
            metrics.REJECTED.labels("queue_full").inc()
        raise
    headers = {"Location": f"{location}{rec.id}"}
    if created:
        metrics.SUBMITTED.inc()
    else:
        headers["Idempotent-Replayed"] = "true"
    return rec, pos, headers, await no_worker_warning(state, sub.spec.id)


async def load(
    state: AppState, job_id: str, who: Principal
) -> tuple[JobRecord, Optional[int], bool]:
    """`(record, position, cancel requested)`, or 404 when there is no such job or it belongs to
    another API key than `who`'s (the same answer: nothing tells another key's job exists)."""
    if not is_job_id(job_id):
        raise not_found(job_id)
    rec, pos, cancel = await state.store.get_full(job_id)
    if rec is None or not who.sees(rec.owner):
        raise not_found(job_id)
    return rec, pos, cancel


def list_args(limit: int, order: str, after: Optional[str]) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise APIError(400, f"limit must be in [1, {MAX_LIST_LIMIT}], got {limit}", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
    if after is not None and not is_job_id(after):
        raise APIError(
            400, f"after must be a job id (video_<32 hex>), got {after[:100]!r}", param="after"
        )


async def list_jobs(state: AppState, limit: int, order: str, after: Optional[str], who: Principal):
    list_args(limit, order, after)
    try:
        return await state.store.list(limit=limit, after=after, order=order, owner=who.list_owner)
    except KeyError:
        # A well-formed cursor naming no job here: like any unknown job, 404.
        raise APIError(
            404,
            f"after={after!r} is not a job on this server (deleted or expired?)",
            param="after",
        ) from None


async def list_page(
    state: AppState, limit: int, order: str, after: Optional[str], view, who: Principal
) -> dict:
    """One cursor page of the jobs `who` sees, `{object: "list", data, first_id, last_id,
    has_more}`, items via `view`."""
    items, has_more = await list_jobs(state, limit, order, after, who)
    data = [view(rec, pos) for rec, pos in items]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def cancel(
    state: AppState, job_id: str, who: Principal
) -> tuple[JobRecord, Optional[int], bool]:
    """Cancel a job: a waiting one at once (also in RQ), a running one by its worker at the next
    step (the flag). Terminal jobs: cancelled ones answer as they are, others 409."""
    rec, _, _ = await load(state, job_id, who)
    if rec.status == JobStatus.cancelled:
        return await load(state, job_id, who)
    if rec.is_terminal:
        raise APIError(
            409, f"job {job_id} already ended as {rec.status}; nothing to cancel", param="id"
        )
    await state.store.request_cancel(job_id)
    if await state.store.mark_cancelled(job_id, allowed=(JobStatus.queued,)):
        await anyio.to_thread.run_sync(cancel_in_rq, state, job_id)
    return await load(state, job_id, who)


async def delete(state: AppState, job_id: str, who: Principal) -> None:
    """Delete a finished or waiting job with its files (files first: with storage unreachable
    the answer is a 503 and the job stays, to be deleted again); a running one is a 409."""
    rec, _, _ = await load(state, job_id, who)
    if rec.status == JobStatus.in_progress:
        raise APIError(
            409,
            f"job {job_id} is in_progress; cancel it first (POST "
            f"/jobs/{job_id}/cancel) and delete it once it has stopped",
            param="id",
        )
    if rec.status == JobStatus.queued:
        await state.store.request_cancel(job_id)
        if not await state.store.mark_cancelled(
            job_id, "deleted while queued", allowed=(JobStatus.queued,)
        ):
            raise APIError(409, f"job {job_id} has just started; cancel it first", param="id")
        await anyio.to_thread.run_sync(cancel_in_rq, state, job_id)
    await anyio.to_thread.run_sync(state.storage.remove, job_id)
    await state.store.delete(job_id)


async def file_response(
    state: AppState,
    request: Request,
    job_id: str,
    name: str,
    media_type: str,
    download_name: Optional[str] = None,
) -> Response:
    """A finished job's file, with HTTP Range support (206 / 416), or a redirect to it
    (`service.downloads`)."""
    rec, _, _ = await load(state, job_id, principal_of(request))
    if rec.status != JobStatus.completed:
        detail = f" ({rec.error_code}: {rec.error_message})" if rec.error_code else ""
        raise APIError(
            409,
            f"job {job_id} is {rec.status}{detail}; its files exist once it is completed",
            param="id",
            code="not_ready",
        )
    return await serve_file(state, request, job_id, name, media_type, download_name)


def deleted_response(job_id: str, obj: str) -> JSON:
    return JSON({"id": job_id, "object": obj, "deleted": True})
