"""Operations: `/healthz` (process up), `/readyz` (Redis and a live worker), `/metrics`, `/models`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from .. import metrics
from ..auth import Principal, principal_of
from ..responses import JSON
from ..state import AppState, get_state

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz():
    """The process answers (no dependency checked)."""
    return JSON({"status": "ok"})


@router.get(
    "/readyz",
    responses={503: {"description": "not ready: Redis unreachable or no live worker (`reason`)"}},
)
async def readyz(request: Request):
    """200 when Redis answers and at least one worker on our queue has a live heartbeat, else 503
    with the reason. Open with API keys on: then only a request with a valid key sees the
    workers' names (which hold host names and process ids)."""
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
    body: dict = {"ready": True, "workers": len(workers)}
    who = principal_of(request)
    if who.admin or who.authenticated:  # keys off, or a valid key: not a stranger's probe
        body["worker_names"] = [w.get("name") for w in workers]
    return JSON(body)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_route(request: Request):
    """Prometheus text format (see `service.metrics`)."""
    state = get_state(request)
    snap = await state.store.metrics_snapshot()
    live = len(await state.store.live_workers(state.settings.QUEUE_NAME))
    return Response(metrics.render(snap, live), media_type=metrics.CONTENT_TYPE)


async def served_models(state: AppState, who: Principal) -> list[dict]:
    """The configured models and any other a live worker serves: registry facts, this
    deployment's limits for each, its default VMoBA settings (as a live worker computes them at
    the model's default size) and the live workers serving it (with the job each runs only for
    `who` may see every job: with API keys, another key's job id is not shown)."""
    workers = await state.store.live_workers(state.settings.QUEUE_NAME)
    specs = dict(state.models)
    for w in workers:
        for info in w.get("model_specs") or ():
            if info.get("id") and info["id"] not in specs:
                specs[info["id"]] = state.known_model(info["id"], workers)
    out = []
    for model_id, spec in specs.items():
        serving = [w for w in workers if model_id in (w.get("models") or ())]
        advertised: dict = next(
            (i for w in serving for i in w.get("model_specs") or () if i.get("id") == model_id), {}
        )
        limits = state.limits(spec).model_dump(exclude={"model", "tasks"})
        out.append(
            {
                **spec.public(),
                "object": "model",
                "owned_by": "vmoba-serve",
                "default": model_id == state.default_model.id,
                "limits": limits,
                "attention_defaults": advertised.get("attention_defaults"),
                "available": bool(serving),
                "workers": [
                    {
                        k: w.get(k)
                        for k in ("name", "device", "job_id")
                        if k != "job_id" or who.admin
                    }
                    for w in serving
                ],
            }
        )
    return out


@router.get("/models")
async def models(request: Request):
    """Models this deployment serves (see `served_models`)."""
    return JSON(
        {"object": "list", "data": await served_models(get_state(request), principal_of(request))}
    )


@router.get("/v1/models")
async def openai_models(request: Request):
    """The same models in the OpenAI list format (extra fields as in `/models`)."""
    served = await served_models(get_state(request), principal_of(request))
    data = [{**m, "created": 0} for m in served]
    return JSON({"object": "list", "data": data})
