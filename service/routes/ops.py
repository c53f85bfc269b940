"""Operations: `/healthz` (process up), `/readyz` (Redis and a live worker), `/metrics`, `/models`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from contract.request import TINY_MODEL

from .. import metrics
from ..responses import JSON
from ..state import get_state
from ..views import model_note

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz():
    """The process answers (no dependency checked)."""
    return JSON({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request):
    """200 when Redis answers and at least one worker on our queue has a live heartbeat, else 503
    with the reason."""
    state = get_state(request)
    try:
        await state.redis.ping()
        workers = await state.store.live_workers(state.settings.QUEUE_NAME)
    except Exception as e:  # any Redis failure means not ready
        return JSON(
            {"ready": False, "reason": f"redis unreachable: {type(e).__name__}"}, status_code=503
        )
    if not workers:
        return JSON(
            {
                "ready": False,
                "reason": f"no live worker on queue {state.settings.QUEUE_NAME!r}",
                "workers": 0,
            },
            status_code=503,
        )
    return JSON(
        {"ready": True, "workers": len(workers), "worker_names": [w.get("name") for w in workers]}
    )


@router.get("/metrics")
async def metrics_route(request: Request):
    """Prometheus text format (see `service.metrics`)."""
    state = get_state(request)
    snap = await state.store.metrics_snapshot()
    live = len(await state.store.live_workers(state.settings.QUEUE_NAME))
    return Response(metrics.render(snap, live), media_type=metrics.CONTENT_TYPE)


@router.get("/models")
async def models(request: Request):
    """The served model, its limits and defaults, and the workers running it."""
    state = get_state(request)
    s, lim = state.settings, state.limits
    workers = await state.store.live_workers(s.QUEUE_NAME)
    return JSON(
        {
            "object": "list",
            "data": [
                {
                    "id": s.MODEL,
                    "object": "model",
                    "owned_by": "vmoba-serve",
                    "tiny": s.MODEL == TINY_MODEL,
                    "note": model_note(s.MODEL),
                    "limits": lim.model_dump(exclude={"model"}),
                    "workers": [
                        {k: w.get(k) for k in ("name", "device", "model", "job_id")}
                        for w in workers
                    ],
                }
            ],
        }
    )
