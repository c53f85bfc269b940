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
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Literal, Optional

import anyio
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

from contract.enqueue import enqueue as rq_enqueue
from contract.keys import idempotency_key, new_job_id, new_seed, request_sha
from contract.models import ModelSpec
from contract.record import JobRecord
from contract.request import GenerateRequest, ValidatedRequest
from contract.speed import Shape, SpeedModel

from .errors import APIError
from .images import Upload, fit_image, from_data_url
from .state import AppState

log = logging.getLogger("service")

MAX_IDEMPOTENCY_KEY_CHARS = 255


@dataclass(frozen=True)
class Submission:
    """A request checked against its model: what `submit` stores and enqueues."""

    spec: ModelSpec
    request: GenerateRequest
    task: Literal["t2v", "i2v"]
    image: Optional[bytes]  # the input image fitted to the video's size (PNG), for i2v
    warnings: tuple[str, ...] = ()


async def resolve_model(state: AppState, name: object) -> ModelSpec:
    """The model a request names (see `AppState.known_model`); live workers are asked only for
    names outside the configuration and the registry."""
    try:
        return state.known_model(name, [])
    except APIError:
        return state.known_model(name, await state.store.live_workers())


async def validate_request(state: AppState, body: dict) -> Submission:
    """A `Submission` from a body dict: the model resolved, the request validated against that
    model's limits (pydantic `ValidationError` -> 400 upstream), the task chosen by whether an
    image came, and the image fitted to the video's size."""
    body = dict(body)
    spec = await resolve_model(state, body.pop("model", None))
    image = body.pop("image", None)
    reference = body.pop("input_reference", None)
    if image is not None and reference is not None:
        raise APIError(400, "give either image or input_reference, not both", param="image")
    upload = image if image is not None else reference
    field = "image" if image is not None else "input_reference"
    req = GenerateRequest.model_validate(
        {**body, "model": spec.id}, context={"limits": state.limits(spec)}
    )
    if upload is None:
        if "t2v" not in spec.tasks:
            raise APIError(
                400,
                f"model {spec.id} makes video from an image: send one as image "
                "(native) or input_reference (OpenAI)",
                param="image",
            )
        return Submission(spec, req, "t2v", None)
    if "i2v" not in spec.tasks:
        raise APIError(
            400,
            f"model {spec.id} is text-to-video only and takes no image; "
            "image-to-video models: GET /models (tasks)",
            param=field,
        )
    if isinstance(upload, str):
        upload = from_data_url(upload, field)
    if not isinstance(upload, Upload):
        raise APIError(400, f"{field} must be an image file or a base64 data URL", param=field)
    width, height, s = req.width, req.height, state.settings
    assert width is not None and height is not None  # filled by validation
    image = upload
    png = await anyio.to_thread.run_sync(
        lambda: fit_image(
            image,
            width,
            height,
            max_bytes=s.MAX_IMAGE_BYTES,
            max_pixels=s.MAX_IMAGE_PIXELS,
        )
    )
    return Submission(spec, req, "i2v", png)


def fastest_estimate_s(live: list[dict], model_id: str, shape: Shape) -> Optional[float]:
    """The least run time `shape` can take on the fastest live worker serving `model_id`, by the
    speeds in their heartbeats (`SpeedModel.lower_bound_s`); None while none has measured one."""
    estimates = []
    for info in live:
        models = info.get("models") or [info.get("model")]
        speed = SpeedModel.from_dict(info.get("speed"))
        if model_id in models and speed is not None:
            estimates.append(speed.lower_bound_s(shape))
    return min(estimates, default=None)


async def check_run_time(state: AppState, sub: Submission) -> None:
    """400 when the request would run longer than `MAX_JOB_S` on every worker serving its model."""
    limit = state.settings.MAX_JOB_S
    if limit <= 0:
        return
    estimate = fastest_estimate_s(
        await state.store.live_workers(), sub.spec.id, Shape.of(sub.request)
    )
    if estimate is not None and estimate > limit:
        raise APIError(
            400,
            f"this request would take at least {estimate:.0f} s on the fastest worker serving "
            f"{sub.spec.id}, over this server's limit of {limit:.0f} s (MAX_JOB_S); ask for "
            "fewer frames, a smaller size or fewer steps",
            code="job_too_long",
        )


async def submit(
    state: AppState,
    sub: Submission,
    *,
    idem_key: Optional[str] = None,
    auth_scope: str = "",
    owner: str = "",
) -> tuple[JobRecord, Optional[int], bool]:
    """Create and enqueue a job owned by `owner` (`contract.keys.owner_id` of the API key, ""
    without keys). Returns `(record, queue position, created)`; `created` is False when an
    idempotent retry found its earlier job."""
    settings = state.settings
    if idem_key is not None and not 1 <= len(idem_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise APIError(
            400,
            f"Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} "
            f"characters, got {len(idem_key)}",
            param="Idempotency-Key",
        )
    await check_run_time(state, sub)
    req = sub.request
    fingerprint = req.model_dump(mode="json")
    if sub.image is not None:
        fingerprint["image_sha256"] = hashlib.sha256(sub.image).hexdigest()
    sha = request_sha(fingerprint)  # before the seed is resolved
    job = req.validated(seed=new_seed(), model=sub.spec.id, task=sub.task)
    job_id, now = new_job_id(), time.time()
    payload = job.to_payload(job_id)
    request = job.model_dump(mode="json")
    result = await state.store.create(
        request,
        model=job.model,
        seed=job.seed,
        job_id=job_id,
        idempotency_key=idempotency_key(idem_key, auth_scope) if idem_key else None,
        idempotency_ttl_s=settings.IDEMPOTENCY_TTL_S,
        max_queued=settings.MAX_QUEUE_DEPTH,
        sha=sha,
        now=now,
        owner=owner,
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
        if sub.image is not None:
            await state.store.put_input_image(job_id, sub.image)
        await enqueue(state, job, job_id, payload)
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
        model=job.model,
        created_at=now,
        total_steps=job.num_inference_steps,
        request_sha=sha,
        owner=owner,
    )
    return rec, result.position, True


def rq_commands(state: AppState, model_id: str, job_id: str, payload: dict) -> list:
    """The Redis commands with which RQ would enqueue the job (recorded, not run)."""
    pipe = state.sync_redis.pipeline(transaction=True)
    try:
        rq_enqueue(
            state.queue(model_id),
            job_id,
            payload,
            result_ttl_s=state.settings.RETENTION_S,
            pipeline=pipe,
        )
        return list(pipe.command_stack)
    finally:
        pipe.reset()


async def enqueue(state: AppState, job: ValidatedRequest, job_id: str, payload: dict) -> None:
    """Put the job on its model's RQ queue: RQ's own commands, sent in one MULTI on the async
    client."""
    commands = rq_commands(state, job.model, job_id, payload)
    async with state.redis.pipeline(transaction=True) as pipe:
        for args, options in commands:
            pipe.execute_command(*args, **options)
        await pipe.execute()


def cancel_in_rq(state: AppState, job_id: str) -> None:
    """Take a waiting job out of RQ's queue (thread; errors mean it is already gone)."""
    with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
        Job.fetch(job_id, connection=state.sync_redis).cancel()
