"""What one worker process holds between jobs: the warm pipeline, its VMoBA handle, Redis, the
measured speed, and the state the heartbeat thread reports (and the watchdog acts on).

```python
rt = Runtime.load(WorkerSettings())      # loads the model, installs VMoBA, warms up, measures
install(rt)                              # worker.jobs.generate_video uses it
attention, sources = rt.attention_settings({"select": "topk"})   # model < operator < request
result = rt.generate(shape, prompt="a cat", seed=1, flow_shift=3.0, attention=attention, on_step=cb)
```

`generate` is the one place the pipeline runs: the prompt is encoded first (timed on its own),
the denoising loop reports every finished step to `on_step` (which may raise to stop the call:
the exception leaves the pipeline before the VAE decode), and frames come back as `uint8`
`[F, H, W, 3]` with per-stage timings, attention statistics and peak GPU memory.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from contract.request import default_flow_shift

from .settings import WorkerSettings, parse_size
from .speed import Shape, SpeedModel

log = logging.getLogger("worker.runtime")

# Models built in code with random weights (no downloads): name -> builder in worker.random_model.
RANDOM_MODELS = ("wan2.1-1.3b-random",)
WARMUP_PROMPT = "warm-up: a red ball rolling on a wooden floor"


@dataclass
class Generation:
    """Output of `Runtime.generate`."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    timings: dict  # text_encoder_s, denoising_s, decoding_s
    attention: dict  # VMoBA statistics of the call (density, FLOPs, ...)
    peak_memory_bytes: Optional[int]  # CUDA only


@dataclass
class CurrentJob:
    """The job this process is running, as the heartbeat and the watchdog see it."""

    job_id: str
    started: float  # time.monotonic()
    deadline: float  # monotonic time after which the job fails with `timeout`
    shape: Shape
    step: int = 0
    total_steps: int = 0


@dataclass
class Runtime:
    settings: WorkerSettings
    name: str
    redis: object
    store: object  # contract.store.JobStore
    storage: object  # contract.storage.Storage (worker.storage.open_storage)
    pipe: object
    handle: object  # vmoba.diffusers.VMoBAHandle
    device: str
    model_info: dict
    speed: SpeedModel
    versions: dict
    # The model's own VMoBA defaults (the first layer of `attention_settings`).
    model_attention_defaults: dict = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    jobs_done: int = 0
    current: Optional[CurrentJob] = None
    stop_requested_at: Optional[float] = None  # monotonic time of the first SIGTERM
    restart_reason: Optional[str] = None  # set after a CUDA OOM: exit 75 after this job
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, settings: WorkerSettings, *, redis_client=None) -> Runtime:
        """Connect, load the model on this process's device, install VMoBA and warm up."""
        import redis as redis_lib

        from contract.store import JobStore
        from vmoba.diffusers import AttentionSettings, install_vmoba

        from .storage import StorageUnavailable, open_storage

        device = resolve_device(settings.WORKER_DEVICE)
        t0 = time.perf_counter()
        pipe = build_pipeline(settings.MODEL, device, settings.DTYPE)
        handle = install_vmoba(pipe, AttentionSettings(kernel=settings.ATTENTION_KERNEL))
        from .pipeline import describe

        info = describe(pipe)
        info["model"] = settings.MODEL
        load_s = time.perf_counter() - t0
        client = redis_client or redis_lib.Redis.from_url(settings.REDIS_URL)
        storage = open_storage(settings)
        try:
            storage.check()
            log.info("results go to %s", storage.describe())
        except StorageUnavailable as exc:  # jobs retry their uploads (STORAGE_RETRY_S)
            log.warning("results storage is not reachable yet: %s", exc)
        rt = cls(
            settings=settings,
            name=settings.name(),
            redis=client,
            store=JobStore(client, retention_s=settings.RETENTION_S),
            storage=storage,
            pipe=pipe,
            handle=handle,
            device=device,
            model_info=info,
            speed=SpeedModel.prior(device),
            versions=collect_versions(device),
        )
        log.info(
            "loaded %s on %s in %.1f s (%s parameters)",
            settings.MODEL,
            device_label(device),
            load_s,
            f"{info.get('param_count', 0):,}",
        )
        rt.warm_up()
        return rt

    def warm_up(self) -> None:
        """One short generation: loads lazy modules, compiles the Triton kernels, and measures
        this worker's speed for timeouts (see `worker.speed`)."""
        if self.settings.WARMUP_STEPS == 0:
            return
        frames, height, width = warmup_size(self.settings)
        shape = Shape(frames, height, width, self.settings.WARMUP_STEPS, 5.0)
        t0 = time.perf_counter()
        attention, _ = self.attention_settings({})
        gen = self.generate(
            shape,
            prompt=WARMUP_PROMPT,
            negative_prompt="",
            seed=0,
            flow_shift=default_flow_shift(width, height),
            attention=attention,
        )
        # encode like a job would, into a scratch file, to time the encoder as well
        from .video import encode_mp4

        scratch = Path(self.settings.DATA_DIR) / "staging" / f"warmup-{os.getpid()}.mp4"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        t_enc = time.perf_counter()
        try:
            encode_mp4(
                gen.frames,
                scratch,
                fps=16,
                crf=self.settings.ENCODE_CRF,
                preset=self.settings.ENCODE_PRESET,
            )
        finally:
            scratch.unlink(missing_ok=True)
        encode_s = time.perf_counter() - t_enc
        self.speed.ref_tokens = shape.tokens
        self.speed.observe(
            shape,
            denoise_s=gen.timings["denoising_s"],
            decode_encode_s=gen.timings["decoding_s"] + encode_s,
            fixed_s=gen.timings["text_encoder_s"],
        )
        log.info(
            "warm-up %dx%dx%d, %d steps in %.2f s: %s",
            frames,
            height,
            width,
            shape.steps,
            time.perf_counter() - t0,
            self.speed.to_dict(),
        )
        free_memory(self.device)

    # -- running the pipeline ------------------------------------------------------------------
    def attention_settings(self, request_attention: dict) -> tuple[Any, dict]:
        """The `AttentionSettings` of one call and where each field came from: model defaults <
        the operator's `ATTENTION_DEFAULTS` (the kernel from `ATTENTION_KERNEL` unless those name
        one) < the request's own fields. `ValueError` names a bad field."""
        from vmoba.diffusers import merge_attention_settings

        operator = {"kernel": self.settings.ATTENTION_KERNEL, **self.settings.ATTENTION_DEFAULTS}
        return merge_attention_settings(
            self.model_attention_defaults, operator, request_attention or {}
        )

    def generate(
        self,
        shape: Shape,
        *,
        prompt: str,
        negative_prompt: str,
        seed: int,
        flow_shift: float,
        attention,
        on_step: Optional[Callable[[int, int], None]] = None,
    ) -> Generation:
        """Run the pipeline once (see the module docstring). `on_step(done, total)` runs after
        every denoising step; an exception from it aborts the call before the VAE decode."""
        with cpu_threads(self.device, self.settings), flow_shift_set(self.pipe, flow_shift):
            return self._generate(
                shape,
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                attention=attention,
                on_step=on_step,
            )

    def _generate(self, shape, *, prompt, negative_prompt, seed, attention, on_step) -> Generation:
        import torch

        pipe, cuda = self.pipe, self.device.startswith("cuda")
        cfg = shape.guidance_scale > 1.0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                prompt=prompt,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=cfg,
                device=torch.device(self.device),
            )
        sync(cuda)
        t1 = time.perf_counter()
        marks = {}

        def callback(_pipe, i, _t, _kwargs):
            done = i + 1
            if done == shape.steps:
                sync(cuda)
                marks["denoised"] = time.perf_counter()
            if on_step is not None:
                on_step(done, shape.steps)
            return {}

        # A CPU generator: the same seed gives the same starting noise on every device.
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        with self.handle.use(attention) as stats:
            out = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds if cfg else None,
                num_frames=shape.num_frames,
                height=shape.height,
                width=shape.width,
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance_scale,
                generator=generator,
                output_type="np",
                callback_on_step_end=callback,
            )
        sync(cuda)
        t3 = time.perf_counter()
        from .video import to_uint8_frames

        frames = to_uint8_frames(out.frames)
        del out, prompt_embeds, negative_embeds
        t2 = marks.get("denoised", t3)
        return Generation(
            frames=frames,
            timings={"text_encoder_s": t1 - t0, "denoising_s": t2 - t1, "decoding_s": t3 - t2},
            attention=dict(stats),
            peak_memory_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        )

    # -- state for the heartbeat ---------------------------------------------------------------
    def begin_job(self, job: CurrentJob) -> None:
        with self.lock:
            self.current = job

    def end_job(self) -> None:
        with self.lock:
            self.current = None

    def heartbeat_info(self) -> dict:
        with self.lock:
            cur = self.current
            info = {
                "queue": self.settings.queues[0],
                "queues": self.settings.queues,
                "model": self.settings.MODEL,
                "tiny": bool(self.model_info.get("tiny")),
                "device": device_label(self.device),
                "state": "busy" if cur else "idle",
                "job_id": cur.job_id if cur else None,
                "step": cur.step if cur else None,
                "total_steps": cur.total_steps if cur else None,
                "speed": self.speed.to_dict(),
                "jobs_done": self.jobs_done,
                "started_at": self.started_at,
                "stopping": self.stop_requested_at is not None,
            }
        return info


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit("WORKER_DEVICE=cuda but torch sees no CUDA device")
    return setting


def device_label(device: str) -> str:
    """`"cuda (NVIDIA H100 80GB HBM3)"` or `"cpu"`."""
    if device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name()})"
    return device


def build_pipeline(model: str, device: str, dtype: str):
    """`MODEL` -> a pipeline on `device`: the random-weight architectures of `RANDOM_MODELS`, or
    whatever `worker.pipeline.load_pipeline` loads (`tiny`, hub ids, directories)."""
    if model in RANDOM_MODELS:
        from .random_model import build_random_pipeline

        return build_random_pipeline(model, device=device, dtype=None if dtype == "auto" else dtype)
    from .pipeline import load_pipeline

    return load_pipeline(model, device=device, dtype=None if dtype == "auto" else dtype)


def warmup_size(settings: WorkerSettings) -> tuple[int, int, int]:
    if settings.WARMUP_SIZE != "auto":
        return parse_size(settings.WARMUP_SIZE)
    return (5, 64, 64) if settings.MODEL == "tiny" else (17, 480, 832)


@contextmanager
def cpu_threads(device: str, settings: WorkerSettings):
    """torch's CPU thread count for one generation (`CPU_THREADS`), restored afterwards so a
    process that does other work (the tests) is not affected."""
    import torch

    if device != "cpu":
        yield
        return
    wanted = settings.CPU_THREADS or (1 if settings.MODEL == "tiny" else (os.cpu_count() or 1))
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def flow_shift_set(pipe, flow_shift: float):
    """The pipeline's scheduler with `flow_shift` for one call (schedulers read it from their
    config when they set their timesteps), restored afterwards."""
    base = pipe.scheduler
    if getattr(base.config, "flow_shift", flow_shift) == flow_shift:
        yield
        return
    pipe.scheduler = type(base).from_config(base.config, flow_shift=float(flow_shift))
    try:
        yield
    finally:
        pipe.scheduler = base


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Return cached GPU memory after a job (or a failed one) so the next starts clean."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def collect_versions(device: str) -> dict:
    """Versions that decide a result, for sidecars."""
    import diffusers
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        from importlib.metadata import version

        out["vmoba_serve"] = version("vmoba-serve")
    except Exception:
        out["vmoba_serve"] = None
    if device.startswith("cuda"):
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
        out["gpu"] = torch.cuda.get_device_name()
    out["commit"] = os.environ.get("VMOBA_COMMIT") or _git_commit()
    return out


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_runtime: Optional[Runtime] = None
_install_lock = threading.Lock()


def install(rt: Optional[Runtime]) -> None:
    """Make `rt` the runtime `worker.jobs.generate_video` uses (None to forget it)."""
    global _runtime
    _runtime = rt


def current() -> Runtime:
    """The installed runtime; loaded from the environment on first use if none was installed
    (e.g. jobs run by a plain RQ worker in a script; without our heartbeat the janitor would
    take such a worker for dead, so services run `python -m worker`)."""
    global _runtime
    with _install_lock:
        if _runtime is None:
            _runtime = Runtime.load(WorkerSettings())
        return _runtime
