"""The one way a job reaches RQ: the job function is named here and nowhere else.

The API never imports the worker (no torch there): RQ imports `JOB_FUNCTION` by dotted path in the
worker process.
"""

from __future__ import annotations

from typing import Any, Optional

from rq import Queue
from rq.job import Job

JOB_FUNCTION = "worker.jobs.generate_video"
# RQ's own job timeout, a generous backstop only: the worker enforces the real one, derived from
# the request's size and its measured speed (1 day).
RQ_TIMEOUT_BACKSTOP_S = 24 * 3600


def queue_name(base: str, model_id: str) -> str:
    """The RQ queue of one model: `<QUEUE_NAME>:<model id>` (workers listen to the queues of the
    models they loaded)."""
    return f"{base}:{model_id}"


def enqueue(
    queue: Queue,
    job_id: str,
    payload: dict,
    *,
    result_ttl_s: int,
    at_front: bool = False,
    pipeline: Optional[Any] = None,
) -> Job:
    """Enqueue `JOB_FUNCTION(payload)` as RQ job `job_id` (on `pipeline` when given: RQ then only
    records its commands)."""
    return queue.enqueue_call(
        JOB_FUNCTION,
        args=(payload,),
        job_id=job_id,
        timeout=RQ_TIMEOUT_BACKSTOP_S,
        result_ttl=result_ttl_s,
        failure_ttl=result_ttl_s,
        description=f"generate {job_id}",
        at_front=at_front,
        pipeline=pipeline,
    )
