"""What one worker process holds between jobs: its warm models (a pipeline per task and a VMoBA
handle each), Redis, the measured speed, and the state the heartbeat thread reports (and the
watchdog acts on).

```python
rt = Runtime.load(WorkerSettings())      # loads every MODEL, installs VMoBA, warms up, measures
install(rt)                              # worker.jobs.generate_video uses it
loaded = rt.model("tiny-wan2.1-t2v")
attention, sources = rt.attention_settings(loaded, grid, {"select": "topk"})  # model < operator < request
result = rt.generate(loaded.spec.id, "t2v", shape, prompt="a cat", negative_prompt="", seed=1,
                     flow_shift=3.0, attention=attention, on_step=cb)
```

`generate` is the one place the pipeline runs: the prompt is encoded first (timed on its own),
the denoising loop reports every finished step to `on_step` (which may raise to stop the call:
the exception leaves the pipeline before the VAE decode), the VAE decodes latent frame by latent
frame handing each chunk of frames to `on_frames` (a job's mp4 encoder: it encodes while the rest
is decoded), and frames come back as `uint8` `[F, H, W, 3]` with per-stage timings, attention
statistics and peak GPU memory.
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
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from contract.models import ModelSpec
from contract.speed import Shape, SpeedModel
from contract.supervise import EXIT_RESTART

from .settings import WorkerSettings, parse_size
from .speedups import compile_enabled

if TYPE_CHECKING:  # for annotations only: `Runtime.load` imports what it uses (vmoba needs torch)
    from redis import Redis

    from contract.storage import Storage
    from contract.store import JobStore
    from vmoba.diffusers import VMoBAHandle

    from .decode import FrameSink
    from .group import Group

log = logging.getLogger("worker.runtime")

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
class LoadedModel:
    """One model on this worker: its registry entry, a pipeline per task (sharing weights) and
    the VMoBA handle installed on every transformer of them."""

    spec: ModelSpec
    pipes: dict[str, Any]  # task -> diffusers pipeline
    handle: VMoBAHandle
    info: dict  # describe(): classes, parameter counts, dtype

    def attention_defaults(self, grid) -> dict:
        """The model's own VMoBA settings at `grid` (the first layer of a job's settings)."""
        from vmoba.defaults import recommended_settings

        return recommended_settings(grid, vmoba_trained=self.spec.vmoba_trained)

    def advertised(self) -> dict:
        """What the heartbeat says of this model (the API's `/models` shows it)."""
        d = self.spec.defaults
        return {
            "id": self.spec.id,
            "tasks": list(self.spec.tasks),
            "vmoba_trained": self.spec.vmoba_trained,
            "attention_defaults": self.attention_defaults(
                self.spec.grid(d.num_frames, d.height, d.width)
            ),
        }


@dataclass
class Runtime:
    settings: WorkerSettings
    name: str
    redis: Redis
    store: JobStore
    storage: Storage  # contract.storage.Storage (worker.storage.open_storage)
    models: dict[str, LoadedModel]
    device: str
    speed: SpeedModel
    versions: dict
    started_at: float = field(default_factory=time.time)
    jobs_done: int = 0
    current: Optional[CurrentJob] = None
    stop_requested_at: Optional[float] = None  # monotonic time of the first SIGTERM
    restart_reason: Optional[str] = None  # set after a CUDA OOM: exit 75 after this job
    lock: threading.Lock = field(default_factory=threading.Lock)
    group: Optional[Group] = None  # this rank's worker group (`GPUS_PER_JOB` > 1), else None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, settings: WorkerSettings, *, redis_client: Optional[Redis] = None) -> Runtime:
        """Connect, load every model of `MODEL` on this process's device, install VMoBA and warm
        up. In a worker group (`GPUS_PER_JOB` > 1) join it first and split the transformers over
        it; followers neither check storage nor warm up (they make rank 0's warm-up calls)."""
        from contract.store import JobStore

        from .group import Group
        from .storage import StorageUnavailable, open_storage

        device = resolve_device(settings.WORKER_DEVICE)
        group = Group.join(settings, device)
        if group is not None:
            device = group.device(device)
        models = {spec.id: load_model(spec, device, settings, group) for spec in settings.models()}
        client = redis_client or settings.redis_client()
        storage = open_storage(settings)
        leads = group is None or group.leader
        try:
            if leads:
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
            models=models,
            device=device,
            speed=SpeedModel.prior(device),
            versions=collect_versions(device),
            group=group,
        )
        if leads:
            rt.warm_up()
        return rt

    def model(self, model_id: str) -> LoadedModel:
        """A loaded model; `ValueError` when this worker does not serve it."""
        if model_id not in self.models:
            raise ValueError(
                f"this worker serves {sorted(self.models)}, not {model_id!r} (a job on the "
                "wrong queue)"
            )
        return self.models[model_id]

    def warm_up(self) -> None:
        """One short generation per model and task: loads lazy modules, compiles the Triton
        kernels, and measures this worker's speed for timeouts (see `contract.speed`)."""
        if self.settings.WARMUP_STEPS == 0:
            return
        for loaded in self.models.values():
            for task in loaded.pipes:
                self._warm_up(loaded, task)
        free_memory(self.device)

    def _warm_up(self, loaded: LoadedModel, task: str) -> None:
        frames, height, width = warmup_size(self.settings, loaded.spec)
        shape = Shape(frames, height, width, self.settings.WARMUP_STEPS, 5.0)
        t0 = time.perf_counter()
        if compile_enabled(self.settings.COMPILE, self.device):
            # One step at another size, then one at this size: the compiler specialises on the
            # first size it sees and makes the sizes dynamic at the second, so no job size
            # recompiles later, and the timed call below includes no compilation.
            m = loaded.spec.size_multiple
            self._warm_up_call(loaded, task, Shape(frames + 4, height + m, width + m, 1, 5.0))
            self._warm_up_call(loaded, task, Shape(frames, height, width, 1, 5.0))
        # encode like a job would (while decoding), into a scratch file, to time the encoder too
        from .video import Mp4Writer

        scratch = Path(self.settings.DATA_DIR) / "staging" / f"warmup-{os.getpid()}.mp4"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        with Mp4Writer(
            scratch, fps=16, crf=settings.ENCODE_CRF, preset=settings.ENCODE_PRESET
        ) as mp4:
            gen = self._warm_up_call(loaded, task, shape, on_frames=mp4.write)
            t_enc = time.perf_counter()
            mp4.finish()
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
            "warm-up of %s (%s) %dx%dx%d, %d steps in %.2f s: %s",
            loaded.spec.id,
            task,
            frames,
            height,
            width,
            shape.steps,
            time.perf_counter() - t0,
            self.speed.to_dict(),
        )

    def _warm_up_call(
        self, loaded: LoadedModel, task: str, shape: Shape, on_frames: Optional[FrameSink] = None
    ) -> Generation:
        frames, height, width = shape.num_frames, shape.height, shape.width
        grid = loaded.spec.grid(frames, height, width)
        attention, _ = self.attention_settings(loaded, grid, {})
        image = warmup_image(width, height) if task == "i2v" else None
        return self.generate(
            loaded.spec.id,
            task,
            shape,
            prompt=WARMUP_PROMPT,
            negative_prompt="",
            seed=0,
            flow_shift=loaded.spec.defaults.flow_shift(width, height),
            attention=attention,
            image=image,
            on_frames=on_frames,
        )

    # -- running the pipeline ------------------------------------------------------------------
    def attention_settings(
        self, loaded: LoadedModel, grid, request_attention: dict
    ) -> tuple[Any, dict]:
        """The `AttentionSettings` of one call and where each field came from: the model's
        defaults at `grid` < the operator's `ATTENTION_DEFAULTS` (the kernel from
        `ATTENTION_KERNEL` unless those name one) < the request's own fields. `ValueError` names
        a bad field."""
        from vmoba.config import merge_attention_settings

        operator = {"kernel": self.settings.ATTENTION_KERNEL, **self.settings.ATTENTION_DEFAULTS}
        return merge_attention_settings(
            loaded.attention_defaults(grid), operator, request_attention or {}
        )

    def generate(
        self,
        model_id: str,
        task: str,
        shape: Shape,
        *,
        prompt: str,
        negative_prompt: str,
        seed: int,
        flow_shift: float,
        attention,
        image=None,
        on_step: Optional[Callable[[int, int], None]] = None,
        on_frames: Optional[FrameSink] = None,
        decode: bool = True,
    ) -> Generation:
        """Run one model's pipeline for `task` once (see the module docstring). `image` (a PIL
        image of the video's size) is the first frame of an i2v job. `on_step(done, total)` runs
        after every denoising step; an exception from it aborts the call before the VAE
        decode. `on_frames(frames)` gets the decoded frames a chunk at a time while the VAE
        decodes the rest (`worker.decode.stream_decode`; an exception from it aborts the
        decode). `decode=False` skips the decode (`frames` is empty).

        Rank 0 of a worker group first shares the call with the other ranks and tells them after
        every step whether to go on (`worker.group`); if the call fails where they cannot follow,
        the process asks for a restart after the job (`restart_reason`), and with it the group.
        """
        loaded = self.model(model_id)
        pipe = loaded.pipes[task]
        group = self.group
        if group is not None and group.leader:
            from .group import encode_call

            group.share(
                encode_call(
                    model_id,
                    task,
                    shape,
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    seed=seed,
                    flow_shift=flow_shift,
                    attention=attention,
                    image=image,
                )
            )
            on_step = group.leading(on_step)
        try:
            with (
                cpu_threads(self.device, self.settings, loaded.spec),
                flow_shift_set(pipe, flow_shift),
            ):
                return self._generate(
                    loaded,
                    task,
                    pipe,
                    shape,
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    seed=seed,
                    attention=attention,
                    image=image,
                    on_step=on_step,
                    on_frames=on_frames,
                    decode=decode,
                )
        except BaseException as exc:
            if group is not None and group.leader and not group.in_step(exc):
                self._out_of_step(exc)
            raise

    def _out_of_step(self, exc: BaseException) -> None:
        """Rank 0's call failed where the followers could not follow (inside a step): they are
        stuck in a collective or gone, so the group must restart. A CUDA OOM or a shutdown
        signal ends the job by its own rule first (the process then exits and the launcher
        restarts every rank); anything else, a rank that died or a failed collective included,
        is a lost worker: exit now and leave the job to the launcher's janitor."""
        if isinstance(exc, (SystemExit, KeyboardInterrupt)) or is_out_of_memory(exc):
            log.error("worker group out of step (%s): restarting it after this job", exc)
            self.restart_reason = "worker group out of step"
            return
        log.error(
            "worker group out of step (%s: %s): exiting; the launcher restarts the group and "
            "the job follows the worker-lost rules",
            type(exc).__name__,
            exc,
        )
        logging.shutdown()
        os._exit(EXIT_RESTART)

    def _generate(
        self,
        loaded,
        task,
        pipe,
        shape,
        *,
        prompt,
        negative_prompt,
        seed,
        attention,
        image,
        on_step,
        on_frames=None,
        decode=True,
    ) -> Generation:
        import torch

        from .families import call_kwargs, prompt_kwargs

        cuda = self.device.startswith("cuda")
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
                **prompt_kwargs(loaded.spec),
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
        extra = call_kwargs(loaded.spec, task, guidance_scale=shape.guidance_scale, image=image)
        with loaded.handle.use(attention) as stats:
            out = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds if cfg else None,
                num_frames=shape.num_frames,
                height=shape.height,
                width=shape.width,
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance_scale,
                generator=generator,
                output_type="latent",  # decoded below, chunk by chunk
                callback_on_step_end=callback,
                **extra,
            )
        del prompt_embeds, negative_embeds
        frames = np.empty((0, 0, 0, 3), np.uint8)
        if decode:
            from .decode import stream_decode

            frames = stream_decode(pipe, out.frames, on_frames)
        del out
        sync(cuda)
        t3 = time.perf_counter()
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
                "queue": self.settings.QUEUE_NAME,
                "queues": self.settings.queues,
                "models": list(self.models),
                "model_specs": [m.advertised() for m in self.models.values()],
                "device": device_label(self.device),
                "gpus_per_job": self.group.size if self.group else 1,
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


def load_model(
    spec: ModelSpec, device: str, settings: WorkerSettings, group: Optional[Group] = None
) -> LoadedModel:
    """Build or load one model's pipelines on `device`, install VMoBA on its transformers and,
    in a worker group, split their calls over it."""
    from vmoba.diffusers import AttentionSettings, install_vmoba

    from .families import build_pipelines
    from .pipeline import describe
    from .speedups import apply_speedups

    t0 = time.perf_counter()
    pipes = build_pipelines(
        spec, device=device, dtype=None if settings.DTYPE == "auto" else settings.DTYPE
    )
    first = next(iter(pipes.values()))
    # The pipelines of one model share their transformers: one handle covers every task.
    handle = install_vmoba(first, AttentionSettings(kernel=settings.ATTENTION_KERNEL))
    if group is not None:
        group.parallelize(handle.transformers)
    # after VMoBA (and the sequence split): the compiled blocks must trace its processor. A group
    # compiles only when COMPILE=1 says so: compile with the sequence split is not yet measured.
    compile_setting = settings.COMPILE if group is None or settings.COMPILE is not None else False
    done = apply_speedups(pipes, device=device, compile=compile_setting, vae=settings.VAE_DTYPE)
    info = {**describe(first), "model": spec.id, "weights": spec.weights}
    info["compiled"] = done["compile"]
    log.info(
        "loaded %s (%s) on %s in %.1f s (%s parameters)",
        spec.id,
        ", ".join(pipes),
        device_label(device),
        time.perf_counter() - t0,
        f"{info.get('param_count', 0):,}",
    )
    return LoadedModel(spec, pipes, handle, info)


def warmup_size(settings: WorkerSettings, spec: ModelSpec) -> tuple[int, int, int]:
    """`WARMUP_SIZE`, or a short clip at the model's default size (a small one for twins built
    in code at toy size)."""
    if settings.WARMUP_SIZE != "auto":
        return parse_size(settings.WARMUP_SIZE)
    if spec.weights == "tiny":
        m = spec.size_multiple
        return 5, 4 * m, 4 * m
    return 17, spec.defaults.height, spec.defaults.width


def warmup_image(width: int, height: int):
    """A smooth colour ramp as the warm-up's first frame (i2v)."""
    from PIL import Image

    ramp = np.linspace(0, 255, width * height * 3, dtype=np.float32).reshape(height, width, 3)
    return Image.fromarray(ramp.astype(np.uint8), "RGB")


@contextmanager
def cpu_threads(device: str, settings: WorkerSettings, spec: ModelSpec):
    """torch's CPU thread count for one generation (`CPU_THREADS`), restored afterwards so a
    process that does other work (the tests) is not affected."""
    import torch

    if device != "cpu":
        yield
        return
    tiny = spec.weights == "tiny"
    wanted = settings.CPU_THREADS or (1 if tiny else (os.cpu_count() or 1))
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def flow_shift_set(pipe, flow_shift: float):
    """The pipeline's scheduler with `flow_shift` for one call (schedulers read it from their
    config when they set their timesteps), restored afterwards. The scheduler object stays the
    same: the VMoBA handle reads the denoising step from it."""
    scheduler = pipe.scheduler
    before = getattr(scheduler.config, "flow_shift", None)
    if before is None or before == flow_shift:
        yield
        return
    scheduler.register_to_config(flow_shift=float(flow_shift))
    try:
        yield
    finally:
        scheduler.register_to_config(flow_shift=before)


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # cuBLAS/cuDNN report failed allocations as plain RuntimeErrors.
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "ALLOC_FAILED" in text
    )


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

    out: dict[str, Optional[str | int]] = {
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
