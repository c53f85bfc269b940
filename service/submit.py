"""Creating jobs, shared by `POST /generate` and `POST /v1/videos`: validate, reserve, enqueue.

1. Validate the body into a `GenerateRequest` against the settings' limits (400 on bad input).
2. Resolve the seed into the frozen `ValidatedRequest` (what is enqueued), then create the record
   atomically with the queue-depth check (429 + Retry-After when full, before anything is
   enqueued) and the Idempotency-Key mapping (the same key and body give the same job; the same
   key with another body is a 409).
3. Enqueue it in RQ (`contract.enqueue`, the job function by dotted path). RQ is synchronous, so it
   writes its commands into a pipeline that is never executed (`enqueue_call(pipeline=...)`), and
   those commands go to Redis in one MULTI on the async client: the event loop never blocks and
   no thread hop is paid. If that fails the record is marked failed and the client gets a 503.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

from contract.enqueue import enqueue as rq_enqueue
from contract.keys import idempotency_key, new_job_id, new_seed, request_sha
from contract.record import JobRecord
from contract.request import GenerateRequest

from .errors import APIError
from .state import AppState

log = logging.getLogger("service")

MAX_IDEMPOTENCY_KEY_CHARS = 255


def validate_request(state: AppState, body: dict) -> GenerateRequest:
    """A `GenerateRequest` from a body dict (pydantic `ValidationError` -> 400 upstream)."""
    return GenerateRequest.model_validate(body, context={"limits": state.limits})


async def submit(
    state: AppState, req: GenerateRequest, *, idem_key: Optional[str] = None, auth_scope: str = ""
) -> tuple[JobRecord, Optional[int], bool]:
    """Create and enqueue a job. Returns `(record, queue position, created)`; `created` is False
    when an idempotent retry found its earlier job."""
    settings = state.settings
    if idem_key is not None and not 1 <= len(idem_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise APIError(
            400,
            f"Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} "
            f"characters, got {len(idem_key)}",
            param="Idempotency-Key",
        )
    sha = request_sha(req.model_dump(mode="json"))  # before the seed is resolved
    job = req.validated(seed=new_seed())
    job_id, now = new_job_id(), time.time()
    payload = job.to_payload(job_id)
    request = job.model_dump(mode="json")
    result = await state.store.create(
        request,
        model=settings.MODEL,
        seed=job.seed,
        job_id=job_id,
        idempotency_key=idempotency_key(idem_key, auth_scope) if idem_key else None,
        idempotency_ttl_s=settings.IDEMPOTENCY_TTL_S,
        max_queued=settings.MAX_QUEUE_DEPTH,
        sha=sha,
        now=now,
    )
    if result.outcome == "full":
        raise APIError(
            429,
            f"the queue is full ({settings.MAX_QUEUE_DEPTH} jobs waiting); "
            f"retry after {settings.RETRY_AFTER_S} s",
            headers={"Retry-After": str(settings.RETRY_AFTER_S)},
        )
    if result.outcome == "conflict":
        raise APIError(
            409,
            f"Idempotency-Key was already used for job {result.job_id} with a "
            "different request; use a new key for a new request",
            param="Idempotency-Key",
        )
    if result.outcome == "existing":
        rec = await state.store.get(result.job_id)
        if rec is None:  # deleted between the two reads
            raise APIError(
                409,
                f"job {result.job_id} of this Idempotency-Key was just deleted; retry",
                param="Idempotency-Key",
            )
        return rec, result.position, False

    try:
        await enqueue(state, job_id, payload)
    except Exception as e:  # Redis went away between the two steps
        log.exception("enqueue of %s failed", job_id)
        try:
            await state.store.mark_failed(job_id, "internal_error", f"could not enqueue: {e}")
        except Exception:
            log.exception("could not mark %s failed", job_id)
        raise APIError(
            503,
            "the job could not be queued (Redis unavailable); retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    rec = JobRecord(
        id=job_id,
        request=request,
        seed=job.seed,
        model=settings.MODEL,
        created_at=now,
        total_steps=job.num_inference_steps,
        request_sha=sha,
    )
    return rec, result.position, True


def rq_commands(state: AppState, job_id: str, payload: dict) -> list:
    """The Redis commands with which RQ would enqueue the job (recorded, not run)."""
    pipe = state.sync_redis.pipeline(transaction=True)
    try:
        rq_enqueue(
            state.queue, job_id, payload, result_ttl_s=state.settings.RETENTION_S, pipeline=pipe
        )
        return list(pipe.command_stack)
    finally:
        pipe.reset()


async def enqueue(state: AppState, job_id: str, payload: dict) -> None:
    """Put the job on RQ's queue: RQ's own commands, sent in one MULTI on the async client."""
    commands = rq_commands(state, job_id, payload)
    async with state.redis.pipeline(transaction=True) as pipe:
        for args, options in commands:
            pipe.execute_command(*args, **options)
        await pipe.execute()


def cancel_in_rq(state: AppState, job_id: str) -> None:
    """Take a waiting job out of RQ's queue (thread; errors mean it is already gone)."""
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
        Job.fetch(job_id, connection=state.sync_redis).cancel()
