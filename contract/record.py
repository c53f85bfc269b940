"""The job record stored in `vmoba:job:<id>` and its codec (Redis hash fields are strings)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .status import TERMINAL_VALUES, JobStatus, Stage, enum_value


@dataclass
class JobRecord:
    """One job as stored in `vmoba:job:<id>`. Times are unix seconds (float)."""

    id: str
    status: str = JobStatus.queued.value
    stage: str = Stage.queued.value
    progress: int = 0
    step: int = 0
    total_steps: int = 0
    request: dict = field(default_factory=dict)  # the validated GenerateRequest, JSON form
    seed: Optional[int] = None
    model: str = ""
    created_at: float = 0.0
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    expires_at: Optional[float] = None
    timings: dict = field(default_factory=dict)  # seconds per stage, e.g. {"denoising_s": 3.2}
    density: Optional[float] = None  # achieved attention density (1.0 = dense)
    # The VMoBA settings that ran and where each came from: {"settings": ..., "sources": ...}.
    attention: dict = field(default_factory=dict)
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    files: list = field(default_factory=list)  # names under DATA_DIR/jobs/<id>/
    worker: Optional[str] = None
    attempts: int = 0  # times a worker started it
    lost: int = 0  # times it was re-queued because its worker died (`LOST_JOB_RETRIES`)
    seq: int = 0  # number of the last event
    request_sha: str = ""
    # Who may see the job: `keys.owner_id` of the API key that created it ("" without keys).
    owner: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_VALUES

    def to_dict(self) -> dict:
        return asdict(self)


_INT_FIELDS = ("progress", "step", "total_steps", "attempts", "lost", "seq")
_OPT_INT_FIELDS = ("seed",)
_FLOAT_FIELDS = ("created_at",)
_OPT_FLOAT_FIELDS = ("started_at", "completed_at", "expires_at", "density")
_JSON_FIELDS = ("request", "files", "attention")
_OPT_STR_FIELDS = ("error_code", "error_message", "worker")


def as_text(value: Any) -> Any:
    """A Redis reply as `str` (clients may or may not use `decode_responses`)."""
    return value.decode() if isinstance(value, bytes) else value


def _encode_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return enum_value(value)


def encode_fields(fields: dict) -> dict:
    """Hash fields as strings; `timings={...}` becomes `t:<name>` fields."""
    out = {}
    for name, value in fields.items():
        if name == "timings":
            for tname, tval in (value or {}).items():
                out[f"t:{tname}"] = repr(float(tval))
            continue
        out[name] = _encode_value(value)
    return out


def fields_json(fields: dict) -> str:
    return json.dumps(encode_fields(fields), separators=(",", ":"))


def decode_record(job_id: str, raw: dict) -> Optional[JobRecord]:
    """A `JobRecord` from HGETALL output (bytes or str), or None if the hash is empty."""
    if not raw:
        return None
    h = {as_text(k): as_text(v) for k, v in raw.items()}
    rec = JobRecord(id=job_id)
    for name, value in h.items():
        if name.startswith("t:"):
            rec.timings[name[2:]] = float(value)
        elif name in _INT_FIELDS:
            setattr(rec, name, int(value or 0))
        elif name in _OPT_INT_FIELDS:
            setattr(rec, name, int(value) if value else None)
        elif name in _FLOAT_FIELDS:
            setattr(rec, name, float(value or 0))
        elif name in _OPT_FLOAT_FIELDS:
            setattr(rec, name, float(value) if value else None)
        elif name in _JSON_FIELDS:
            setattr(rec, name, json.loads(value) if value else type(getattr(rec, name))())
        elif name in _OPT_STR_FIELDS:
            setattr(rec, name, value or None)
        elif name in ("status", "stage", "model", "request_sha", "owner"):
            setattr(rec, name, value)
    return rec


def make_event(rec_fields: dict, job_id: str, type_: str, **extra) -> dict:
    """An event as published: `{type, job_id, ts, status?, stage?, progress?, step?, ...}`.

    `seq` (the SSE id) is added by the Lua transition.
    """
    ev = {"type": type_, "job_id": job_id, "ts": time.time()}
    for name in (
        "status",
        "stage",
        "progress",
        "step",
        "total_steps",
        "error_code",
        "error_message",
        "worker",
    ):
        if name in rec_fields and rec_fields[name] is not None:
            value = rec_fields[name]
            ev[name] = enum_value(value) if isinstance(value, (JobStatus, Stage)) else value
    ev.update(extra)
    return ev
