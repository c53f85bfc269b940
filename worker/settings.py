"""Settings of the worker processes (`python -m worker` and each worker it starts).

One pydantic-settings class, read from the environment; field names are the environment variable
names (`HEARTBEAT_TTL_S`), units are in the names (`_S` seconds). Each default is explained where
it is defined.
"""

from __future__ import annotations

import json
import socket
from typing import Literal, Optional

from pydantic import Field, field_validator

from contract.enqueue import queue_name
from contract.settings import SharedSettings


class WorkerSettings(SharedSettings):
    """Environment of a worker process; the settings shared with the API (`REDIS_URL`,
    `DATA_DIR`, `QUEUE_NAME`, `RETENTION_S`, `MODEL`) come from `SharedSettings`."""

    # --- the model on this worker ------------------------------------------------------------
    WORKER_DEVICE: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` is `cuda` when a GPU is visible, else `cpu`. The launcher sets it per child."""
    DTYPE: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto`: bf16 on CUDA, fp32 on CPU (what `worker.pipeline.load_pipeline` picks)."""
    CPU_THREADS: int = Field(0, ge=0)
    """torch threads of a CPU worker; 0 = auto: 1 for the tiny model (its matrices are too small
    to split, and extra threads only wait on each other), else all cores."""
    ATTENTION_KERNEL: Literal["auto", "triton", "reference"] = "auto"
    """VMoBA implementation: `auto` = Triton on CUDA, the plain PyTorch reference on CPU."""
    ATTENTION_DEFAULTS: dict = Field(default_factory=dict)
    """The operator's JSON object of `vmoba.AttentionSettings` fields, e.g.
    `{"select": "topk", "topk": [2, 6, 18]}`: over the model's defaults, under what a request
    sets (model < operator < request)."""
    COMPILE: Optional[bool] = None
    """`torch.compile` the transformer blocks (around VMoBA's op; `worker.speedups`) at start-up,
    in the warm-up, so the ready time includes it. Unset: on for CUDA workers, off on the CPU;
    `0` switches it off. Caches: `TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`."""
    VAE_DTYPE: Literal["auto", "bf16", "fp32"] = "auto"
    """Precision of the VAE decode: `auto` is bf16 on CUDA (1.56x faster than fp32 on an H100,
    frames within 46.5 dB PSNR of fp32's: docs/benchmarks.md), fp32 on the CPU."""
    WARMUP_STEPS: int = Field(2, ge=0)
    """Denoising steps of the start-up generation that loads kernels and measures speed; 0 skips
    it (speed then comes from the first job)."""
    WARMUP_SIZE: str = "auto"
    """`FRAMESxHEIGHTxWIDTH` of the warm-up generation; `auto` is 5x64x64 for the tiny model and
    17x480x832 otherwise (480p is what most requests ask for, so its kernels get tuned)."""
    ENCODE_CRF: int = Field(18, ge=0, le=51)
    """x264 quality of the mp4 (lower is better and bigger)."""
    ENCODE_PRESET: str = "medium"
    """x264 speed/size trade-off."""

    # --- several GPUs per job (`worker.group`) ------------------------------------------------
    GPUS_PER_JOB: int = Field(1, ge=1)
    """GPUs that share one job (Ulysses context parallelism: each runs the whole pipeline on
    1/N of the video's tokens, then attention on 1/N of the heads). The launcher starts groups
    of this many ranks, one process per GPU; it must divide the model's attention heads (Wan
    1.3B: 12 -> 2, 3, 4, 6; 14B: 40 -> 2, 4, 5, 8). 1: one worker per GPU. On a CPU-only host
    it is the number of CPU processes of the one group (tests)."""
    GROUP_RANK: int = Field(0, ge=0)
    """This process's rank in its group; set by the launcher."""
    GROUP_PORT: int = Field(0, ge=0, le=65535)
    """Local TCP port of the group's store (rank 0 serves it); set by the launcher."""
    GROUP_BEAT_FILE: str = ""
    """A file a follower rank touches every `HEARTBEAT_INTERVAL_S` (its launcher reads the time:
    `HEARTBEAT_TTL_S` without a touch means hung); set by the launcher."""
    GROUP_TIMEOUT_S: float = Field(600.0, gt=0)
    """How long the ranks wait for each other to join, and a collective (an all-to-all inside a
    step) for every rank, before it fails and the group is restarted."""

    # --- identity and liveness ---------------------------------------------------------------
    WORKER_NAME: str = ""
    """Unique name of one worker process (RQ's and our heartbeat key); the launcher sets it.
    Empty: `<host>.<pid>`."""
    HEARTBEAT_INTERVAL_S: float = Field(2.0, gt=0)
    """How often each worker writes its heartbeat, busy or idle."""
    HEARTBEAT_TTL_S: float = Field(15.0, gt=0)
    """A worker whose heartbeat is older than this is dead; its job is failed or retried. Several
    intervals, so a slow Redis round trip is not a death. A worker process whose heartbeat
    stopped this long (hung with the GIL held, SIGSTOPped) is killed and replaced by its
    launcher."""
    REDIS_RETRY_S: float = Field(30.0, ge=0)
    """How long a worker retries a Redis command that meets a dropped connection (exponential
    back-off up to 1 s apart) before the error counts: a Redis restart (its append-only file
    keeps the data) pauses the running job instead of failing it."""
    LOST_JOB_RETRIES: int = Field(0, ge=0, le=3)
    """How many times a job whose worker died is re-queued before it fails with `worker_lost`
    (0: fail at once; 1: retry once)."""

    # --- timeouts and shutdown ---------------------------------------------------------------
    JOB_TIMEOUT_FACTOR: float = Field(3.0, ge=1.0)
    """A job may take this many times its estimate (request size x this worker's measured speed)
    before it fails with `timeout`."""
    JOB_TIMEOUT_MIN_S: float = Field(60.0, gt=0)
    """Floor of a job's timeout, so small jobs are not killed by a noisy estimate."""
    JOB_TIMEOUT_MAX_S: float = Field(4 * 3600.0, gt=0)
    """Ceiling of a job's timeout."""
    HARD_TIMEOUT_GRACE_S: float = Field(60.0, gt=0)
    """If a job overruns its timeout by this much without reaching a step boundary (a hung
    kernel, a stuck decode), the watchdog fails it and kills the process, which is restarted."""
    CANCEL_GRACE_S: float = Field(10.0, gt=0)
    """A running job stops at its next denoising step once cancelled. If it has not stopped this
    long after its launcher saw the cancel (a long step, a stuck kernel, a slow decode or
    upload), the launcher kills the worker process (SIGKILL), the job ends `cancelled` and a
    fresh worker takes its place: a cancel takes effect within about this plus two
    `HEARTBEAT_INTERVAL_S`."""
    STOP_GRACE_S: float = Field(90.0, ge=0)
    """On SIGTERM the current job finishes if it should end within this many seconds; otherwise
    it stops at the next step and is re-queued at the front. Keep below compose's
    `stop_grace_period`."""
    RESTART_BACKOFF_MAX_S: float = Field(30.0, gt=0)
    """The launcher restarts exited workers after 1 s, doubling up to this while they keep dying
    within a minute of starting."""
    RQ_RESULT_TTL_S: int = Field(600, ge=0)
    """How long RQ keeps its own result of a job; our records (in `vmoba:`) are what the API reads."""
    WORKER_BURST: bool = False
    """Exit when the queue is empty instead of waiting for jobs (batch runs, tests)."""

    # --- results storage (`STORAGE_URL` is shared: `contract.settings`) -----------------------
    STORAGE_RETRY_S: float = Field(300.0, ge=0)
    """How long a worker keeps retrying (exponential back-off, up to 30 s apart) to publish a
    finished job's files while object storage is unreachable or refuses them. The files wait in
    the worker's staging directory and the job stays `in_progress` (stage `encoding`); after
    this the job fails with `storage_unavailable`."""
    STORAGE_MULTIPART_BYTES: int = Field(64 * 1024 * 1024, ge=5 * 1024 * 1024)
    """Files at least this big go to object storage as multipart uploads (in 16 MiB parts)."""

    # --- janitor -----------------------------------------------------------------------------
    JANITOR_INTERVAL_S: float = Field(10.0, gt=0)
    """How often the launcher runs the janitor (dead workers' jobs, expired results)."""
    ORPHAN_GRACE_S: float = Field(60.0, gt=0)
    """A queued record younger than this may still be on its way into RQ (the API creates the
    record, then enqueues): the janitor leaves it alone; older, with no RQ job waiting, it is
    enqueued again."""
    STAGING_MAX_AGE_S: float = Field(3600.0, gt=0)
    """Staging directories untouched this long were left by a killed worker and are removed."""

    # --- tests -------------------------------------------------------------------------------
    ENABLE_TEST_HOOKS: bool = False
    """Honour a payload's `_test` object (see `worker.jobs`): injected out-of-memory errors and
    per-step delays for the CPU tests. Off in every deployment."""
    LOG_LEVEL: str = "INFO"

    @field_validator("ATTENTION_DEFAULTS", mode="before")
    @classmethod
    def _parse_json(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"ATTENTION_DEFAULTS must be a JSON object, got {value!r}"
                ) from exc
        if not isinstance(value, dict):
            raise ValueError(f"ATTENTION_DEFAULTS must be a JSON object, got {value!r}")
        return value

    @field_validator("WARMUP_SIZE")
    @classmethod
    def _check_size(cls, value: str) -> str:
        if value != "auto":
            parse_size(value)
        return value

    @property
    def queues(self) -> list[str]:
        """The RQ queues worked, in priority order: each `QUEUE_NAME` (comma-separated) for each
        model loaded (`contract.enqueue.queue_name`)."""
        names = [q.strip() for q in self.QUEUE_NAME.split(",") if q.strip()]
        if not names:
            raise ValueError(f"QUEUE_NAME names no queue: {self.QUEUE_NAME!r}")
        return [queue_name(q, spec.id) for q in names for spec in self.models()]

    def redis_client(self, **kwargs):
        """A client of `REDIS_URL` that rides out a Redis restart (`REDIS_RETRY_S`)."""
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError
        from redis.retry import Retry

        first, cap = 0.05, 1.0
        retries, waited = 0, 0.0
        while waited < self.REDIS_RETRY_S:
            waited += min(cap, first * 2**retries)
            retries += 1
        retry = Retry(ExponentialBackoff(cap=cap, base=first), retries)
        return redis.Redis.from_url(
            self.REDIS_URL,
            retry=retry,
            retry_on_error=[ConnectionError, TimeoutError],
            **kwargs,
        )

    def name(self) -> str:
        import os

        return self.WORKER_NAME or f"{socket.gethostname()}.{os.getpid()}"


def parse_size(text: str) -> tuple[int, int, int]:
    """`"17x480x832"` -> `(17, 480, 832)` (frames, height, width)."""
    try:
        frames, height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"size must be FRAMESxHEIGHTxWIDTH like 17x480x832, got {text!r}"
        ) from None
    if frames < 1 or (frames - 1) % 4 or height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"size {text!r}: frames must be 4k+1, height and width multiples of 16")
    return frames, height, width
