"""Job records as the two API families show them: native `JobObject` and OpenAI `VideoObject`.

Plain dicts (rendered with orjson) shaped like `schemas.JobObject` / `schemas.VideoObject`; building
dicts directly keeps status reads cheap.
"""

from __future__ import annotations

from typing import Optional

from contract.models import REGISTRY
from contract.record import JobRecord
from contract.request import format_seconds
from contract.status import openai_status


def _int(t: Optional[float]) -> Optional[int]:
    return None if t is None else int(t)


def model_note(model: str) -> Optional[str]:
    """What a reader should know about the model's output (tiny and random-weight twins make
    noise)."""
    spec = REGISTRY.get(model)
    return spec.note if spec is not None and spec.note else None


def _error(rec: JobRecord) -> Optional[dict]:
    if rec.error_code is None and rec.status not in ("failed", "cancelled"):
        return None
    return {"code": rec.error_code or "internal_error", "message": rec.error_message or ""}


def job_view(
    rec: JobRecord, position: Optional[int] = None, *, cancel_requested: bool = False
) -> dict:
    """The native job object (`GET /jobs/{id}`)."""
    base = f"/jobs/{rec.id}"
    urls = {"self": base, "events": f"{base}/events"}
    if rec.status == "completed":
        urls.update(video=f"{base}/video", thumbnail=f"{base}/thumbnail")
    return {
        "id": rec.id,
        "object": "job",
        "status": rec.status,
        "stage": rec.stage,
        "progress": rec.progress,
        "step": rec.step,
        "total_steps": rec.total_steps,
        "queue_position": position,
        "model": rec.model,
        "model_note": model_note(rec.model),
        "request": rec.request,
        "seed": rec.seed,
        "created_at": _int(rec.created_at),
        "started_at": _int(rec.started_at),
        "completed_at": _int(rec.completed_at),
        "expires_at": _int(rec.expires_at),
        "timings": rec.timings,
        "attention": rec.attention or None,
        "density": rec.density,
        "error": _error(rec),
        "cancel_requested": cancel_requested,
        "attempts": rec.attempts,
        "worker": rec.worker,
        "urls": urls,
    }


def video_view(rec: JobRecord, position: Optional[int] = None) -> dict:
    """The OpenAI Videos object (`GET /v1/videos/{id}`), plus our extra fields."""
    req = rec.request
    frames, fps = req.get("num_frames"), req.get("fps")
    seconds = format_seconds((frames - 1) / fps) if frames and fps else "0"
    return {
        "id": rec.id,
        "object": "video",
        "status": openai_status(rec.status),
        "progress": rec.progress,
        "created_at": _int(rec.created_at),
        "completed_at": _int(rec.completed_at),
        "expires_at": _int(rec.expires_at),
        "model": rec.model,
        "prompt": req.get("prompt"),
        "seconds": seconds,
        "size": f"{req.get('width')}x{req.get('height')}",
        "error": _error(rec),
        "remixed_from_video_id": None,
        "model_note": model_note(rec.model),
        "seed": rec.seed,
        "queue_position": position,
        "num_frames": frames,
        "fps": fps,
        "attention": rec.attention.get("settings") or req.get("attention"),
        "attention_sources": rec.attention.get("sources"),
        "density": rec.density,
        "timings": rec.timings,
    }
