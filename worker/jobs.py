"""The job function: `worker.jobs.generate_video(payload)`, enqueued by the API by dotted path.

`payload` is one JSON-able dict, `contract.request.ValidatedRequest.to_payload(job_id)`: the
request the API validated, plus `job_id`. The job record in Redis (`contract.store.JobStore`) is
what users see; RQ only carries the work. A run:

1. skips a job whose record is gone or finished, and cancels one whose cancel flag is up;
2. decodes the payload (`invalid_request` if it is malformed; the API's limits are not checked
   again) and merges the attention settings: model defaults < `ATTENTION_DEFAULTS` < request;
3. `queued -> in_progress` (`mark_started`; False means someone else took it or it was cancelled);
4. runs the pipeline with the request's VMoBA settings for this call only. After every denoising
   step it publishes progress and checks, in one Redis round trip, the cancel flag and that the
   record is still this worker's; it enforces the job's timeout (request size x measured speed,
   see `contract.speed`) and a pending SIGTERM (re-queue unless the job ends within
   `STOP_GRACE_S`). Stopping raises out of the diffusers step callback, so the VAE decode is
   skipped and the GPU memory is freed at once;
5. decodes the video latent frame by latent frame (stage `decoding`), each chunk of frames going
   to ffmpeg at once (`worker.decode`, `worker.video.Mp4Writer`), so the mp4 is encoded while
   the rest is decoded; a cancel is checked after every chunk and kills ffmpeg. `decoding_s` runs
   from the last step to the last decoded frame, `encoding_s` (stage `encoding`) is what the
   encoder, the thumbnail and the sidecar take after it;
6. writes `video.mp4`, `thumbnail.jpg` and `meta.json` into a staging directory and publishes
   them (`contract.storage`: one rename into `DATA_DIR`, or uploads to object storage with the
   sidecar last), then marks the record completed. While object storage is unreachable or
   refuses the files, the worker retries with exponential back-off for `STORAGE_RETRY_S`: the
   files wait in the staging directory, the job stays `in_progress` at stage `encoding` and the
   heartbeat thread keeps beating; a cancel, a deleted record or a shutdown (after
   `STOP_GRACE_S`) still end it between attempts.

Every way out ends the record in a final state, or back in `queued` for another worker:

| what happened | record | RQ |
|---|---|---|
| bad payload | failed `invalid_request` | finished |
| cancel flag | cancelled | finished |
| over its timeout | failed `timeout` | finished |
| CUDA out of memory | failed `gpu_oom`; the process exits with 75 and the launcher restarts it | finished |
| storage down for all of `STORAGE_RETRY_S` | failed `storage_unavailable` | finished |
| SIGTERM while storage is down, past `STOP_GRACE_S` | queued again | re-queued at the front |
| SIGTERM, long job left | queued again | re-queued at the front (`Retry`) |
| second SIGTERM (cold shutdown) | queued again | re-queued at the front |
| anything else | failed `internal_error` | finished |
| worker killed | the janitor (`worker.janitor`): see below | cleaned up by the janitor |
| cancel not honoured in `CANCEL_GRACE_S` | the launcher kills the worker: cancelled | cleaned up by the janitor |

A killed worker's job is completed if its result is in storage, cancelled if a cancel was
requested, else re-queued (`LOST_JOB_RETRIES`) or failed with `worker_lost`.

Test hooks (only with `ENABLE_TEST_HOOKS=1`; never in a deployment): a payload may carry
`"_test": {"step_delay_s": 0.2, "oom_at_step": 2, "fail_at_step": 3, "decode_delay_s": 0.2}` to
sleep after every step, raise `torch.OutOfMemoryError` in the step callback at that step (what a
real CUDA OOM in the denoising loop raises), raise a plain error there, or sleep after every
decoded chunk. The CPU tests use them to exercise the timeout, cancellation, OOM and crash paths
with the tiny model.
"""

from __future__ import annotations

import io
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from rq import Retry
from rq.timeouts import JobTimeoutException

from contract.files import INPUT_FILE, META_FILE, RESULT_FILES, THUMBNAIL_FILE, VIDEO_FILE
from contract.keys import cancel_key, is_job_id, job_key
from contract.record import JobRecord, as_text
from contract.request import ValidatedRequest
from contract.speed import Shape
from contract.status import ErrorCode, Stage
from contract.storage import Staged, StorageUnavailable

from . import runtime as runtime_mod
from .runtime import CurrentJob, Runtime, free_memory, is_out_of_memory
from .video import Mp4Writer, write_thumbnail

log = logging.getLogger("worker.jobs")

# A job stopped by SIGTERM goes back to the queue; cap how often, in case something keeps
# stopping workers in a loop.
MAX_SHUTDOWN_REQUEUES = 20
# Publishing retries: the first wait, doubling up to the longest (seconds).
PUBLISH_FIRST_BACKOFF_S = 0.5
PUBLISH_MAX_BACKOFF_S = 30.0
# The watchdog leaves a publishing job alone for STORAGE_RETRY_S plus this (the last attempt's
# own upload time): waiting for storage is not the job overrunning its timeout.
PUBLISH_WATCHDOG_MARGIN_S = 300.0


class StopJob(Exception):
    """Raised from the step callback to leave the pipeline (before the VAE decode)."""


class JobCancelled(StopJob):
    pass


class JobTimedOut(StopJob):
    pass


class JobRequeued(StopJob):
    pass


class StorageFailed(Exception):
    """Storage stayed unreachable for all of `STORAGE_RETRY_S`: the job fails with
    `storage_unavailable`."""


class JobTakenAway(StopJob):
    """The record was deleted, or is no longer this worker's (the janitor took it): stop without
    touching it."""


@dataclass(frozen=True)
class FaultHooks:
    step_delay_s: float = 0.0
    oom_at_step: int = 0
    fail_at_step: int = 0
    decode_delay_s: float = 0.0

    @classmethod
    def parse(cls, raw, enabled: bool) -> FaultHooks:
        if not raw:
            return cls()
        if not enabled:
            log.warning("ignoring payload test hooks %r: ENABLE_TEST_HOOKS is off", raw)
            return cls()
        names = {"step_delay_s", "oom_at_step", "fail_at_step", "decode_delay_s"}
        if not isinstance(raw, dict) or set(raw) - names:
            raise ValueError(
                f"_test must be an object with keys among {sorted(names)}, got {raw!r}"
            )
        return cls(
            float(raw.get("step_delay_s", 0)),
            int(raw.get("oom_at_step", 0)),
            int(raw.get("fail_at_step", 0)),
            float(raw.get("decode_delay_s", 0)),
        )


class StreamedVideo:
    """A job's staging directory and its mp4 encoder, opened when the first decoded frames
    arrive (a staging directory left untouched through a long denoise would look abandoned to
    the janitor, `STAGING_MAX_AGE_S`). Leaving the block without publishing kills the encoder
    and removes every file."""

    def __init__(self, storage, job_id: str, *, fps: float, crf: int, preset: str):
        self.storage, self.job_id = storage, job_id
        self.fps, self.crf, self.preset = fps, crf, preset
        self._stack = ExitStack()
        self._staged: Staged | None = None
        self._mp4: Mp4Writer | None = None

    def write(self, frames) -> None:
        """Hand decoded frames (`uint8` `[f, H, W, 3]`) to the encoder."""
        if self._mp4 is None:
            staged = self._stack.enter_context(self.storage.stage(self.job_id))
            self._mp4 = self._stack.enter_context(
                Mp4Writer(staged.file(VIDEO_FILE), fps=self.fps, crf=self.crf, preset=self.preset)
            )
            self._staged = staged
        self._mp4.write(frames)

    def opened(self) -> tuple[Staged, Mp4Writer]:
        """The staging directory and the encoder, once frames were written."""
        if self._staged is None or self._mp4 is None:
            raise RuntimeError("the decode handed on no frames")
        return self._staged, self._mp4

    def __enter__(self) -> StreamedVideo:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)


def generate_video(payload: dict) -> dict | Retry:
    """Run one generation job (see the module docstring). Returns a small summary for RQ, or
    `Retry` to put the job back at the front of the queue (shutdown)."""
    rt = runtime_mod.current()
    return JobRun(rt, payload).run()


class JobRun:
    def __init__(self, rt: Runtime, payload: Any):
        self.rt = rt
        self.payload = payload
        self.store = rt.store
        self.settings = rt.settings
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        # "" when the payload names no valid job: `run` refuses it before anything uses the id.
        self.job_id: str = job_id if is_job_id(job_id) else ""
        self.cur: CurrentJob | None = None  # set once the job has started
        self.record: JobRecord | None = None  # the record as the run found it

    # -- the whole run -------------------------------------------------------------------------
    def run(self):
        job_id, store = self.job_id, self.store
        if not is_job_id(job_id):
            # No record can be named: nothing to update. RQ shows it as failed.
            raise ValueError(f"payload has no valid job_id: {self.payload!r:.200}")
        rec = store.get(job_id)
        if rec is None:
            log.info("job %s: no record (deleted before it started), skipping", job_id)
            return {"job_id": job_id, "status": "skipped"}
        if rec.is_terminal:
            log.info("job %s is already %s, skipping", job_id, rec.status)
            return {"job_id": job_id, "status": rec.status}
        self.record = rec
        if rec.status == "queued" and store.is_cancel_requested(job_id):
            store.mark_cancelled(job_id, "cancelled before it started")
            return {"job_id": job_id, "status": "cancelled"}
        try:
            body = dict(self.payload)
            hooks = FaultHooks.parse(body.pop("_test", None), self.settings.ENABLE_TEST_HOOKS)
            _, request = ValidatedRequest.from_payload(body)
            loaded = self.rt.model(request.model)
            grid = loaded.spec.grid(request.num_frames, request.height, request.width)
            if self.rt.group is not None:  # the group splits the tokens evenly over its GPUs
                from vmoba.parallel import check_tokens

                check_tokens(grid[0] * grid[1] * grid[2], self.rt.group.size)
            attention, sources = self.rt.attention_settings(loaded, grid, request.attention)
            image = self._input_image(request)
        except ValueError as exc:
            message = f"invalid request: {_describe_invalid(exc)}"
            log.warning("job %s: %s", job_id, message)
            store.mark_failed(job_id, ErrorCode.invalid_request.value, message)
            return {"job_id": job_id, "status": "failed", "error": "invalid_request"}
        if not store.mark_started(job_id, worker=self.rt.name):
            log.info("job %s could not be started (cancelled, deleted or taken), skipping", job_id)
            return {"job_id": job_id, "status": "skipped"}

        shape = Shape.of(request)
        timeout_s = self.rt.speed.timeout_s(
            shape,
            factor=self.settings.JOB_TIMEOUT_FACTOR,
            min_s=self.settings.JOB_TIMEOUT_MIN_S,
            max_s=self.settings.JOB_TIMEOUT_MAX_S,
        )
        now = time.monotonic()
        self.cur = CurrentJob(
            job_id, started=now, deadline=now + timeout_s, shape=shape, total_steps=shape.steps
        )
        self.timeout_s = timeout_s
        self.rt.begin_job(self.cur)
        log.info(
            "job %s: %d frames %dx%d, %d steps, timeout %.0f s",
            job_id,
            shape.num_frames,
            shape.width,
            shape.height,
            shape.steps,
            timeout_s,
        )
        try:
            return self._run_started(request, attention, sources, image, hooks, rec.attempts + 1)
        except JobCancelled:
            store.mark_cancelled(
                job_id,
                f"cancelled while running, at step {self.cur.step} of {self.cur.total_steps}",
            )
            return {"job_id": job_id, "status": "cancelled"}
        except JobTimedOut as exc:
            store.mark_failed(job_id, ErrorCode.timeout.value, str(exc))
            return {"job_id": job_id, "status": "failed", "error": "timeout"}
        except JobTakenAway as exc:
            log.warning("job %s: %s; stopping without touching its record", job_id, exc)
            return {"job_id": job_id, "status": "taken"}
        except StorageFailed as exc:
            log.error("job %s: %s", job_id, exc)
            store.mark_failed(job_id, ErrorCode.storage_unavailable.value, str(exc))
            return {"job_id": job_id, "status": "failed", "error": "storage_unavailable"}
        except (JobRequeued, SystemExit, KeyboardInterrupt) as exc:
            return self._requeue(exc)
        except Exception as exc:
            if is_out_of_memory(exc):
                message = self._oom_message(exc)
                log.error("job %s: %s", job_id, message)
                store.mark_failed(job_id, ErrorCode.gpu_oom.value, message)
                self.rt.restart_reason = "gpu_oom"
                return {"job_id": job_id, "status": "failed", "error": "gpu_oom"}
            if isinstance(exc, JobTimeoutException):  # RQ's backstop alarm (job_timeout)
                store.mark_failed(job_id, ErrorCode.timeout.value, f"timed out: {_one_line(exc)}")
                return {"job_id": job_id, "status": "failed", "error": "timeout"}
            log.exception("job %s failed", job_id)
            store.mark_failed(
                job_id, ErrorCode.internal_error.value, f"{type(exc).__name__}: {_one_line(exc)}"
            )
            return {"job_id": job_id, "status": "failed", "error": "internal_error"}
        finally:
            self.rt.end_job()
            free_memory(self.rt.device)

    def _input_image(self, request: ValidatedRequest):
        """The stored first frame of an i2v job (a PIL image of the video's size), else None."""
        if request.task != "i2v":
            return None
        from PIL import Image

        data = self.store.get_input_image(self.job_id)
        if data is None:
            raise ValueError("the job's input image is gone (expired or deleted)")
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if image.size != (request.width, request.height):
            raise ValueError(
                f"input image is {image.size[0]}x{image.size[1]}, the video "
                f"{request.width}x{request.height}"
            )
        return image

    def _run_started(
        self,
        request: ValidatedRequest,
        attention,
        sources: dict,
        image,
        hooks: FaultHooks,
        attempt: int,
    ) -> dict:
        rt, store, job_id, cur = self.rt, self.store, self.job_id, self.cur
        assert cur is not None, "the job has started"
        seed = request.seed
        output = StreamedVideo(
            rt.storage,
            job_id,
            fps=request.fps,
            crf=self.settings.ENCODE_CRF,
            preset=self.settings.ENCODE_PRESET,
        )
        with output:
            gen = rt.generate(
                request.model,
                request.task,
                cur.shape,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                seed=seed,
                flow_shift=request.flow_shift,
                attention=attention,
                image=image,
                on_step=lambda done, total: self._on_step(done, total, hooks),
                on_frames=lambda frames: self._on_frames(output, frames, hooks),
            )
            # every frame is decoded and queued for the encoder, which may still be working
            store.mark_stage(job_id, Stage.encoding)
            timings = dict(gen.timings)
            t_enc = time.perf_counter()
            staged, mp4 = output.opened()
            thumb = write_thumbnail(gen.frames, staged.file(THUMBNAIL_FILE))
            files = list(RESULT_FILES)
            if image is not None:
                image.save(staged.file(INPUT_FILE), format="PNG")
                files.append(INPUT_FILE)
            video = mp4.finish()
            timings["encoding_s"] = time.perf_counter() - t_enc
            timings["total_s"] = time.monotonic() - cur.started
            density = achieved_density(gen.attention)
            staged.write_json(
                META_FILE,
                self._sidecar(request, attention, sources, gen, video, thumb, timings, attempt),
            )
            if self._check_owner():  # a cancel during decode/encode still wins before publishing
                raise JobCancelled()
            t_pub = time.perf_counter()
            self._publish(staged)
            timings["upload_s"] = time.perf_counter() - t_pub
            timings["total_s"] += timings["upload_s"]
        ran = {"settings": attention.to_dict(), "sources": sources}
        if not store.mark_completed(
            job_id, files=files, timings=timings, density=density, attention=ran
        ):
            if store.get(job_id) is None:  # deleted while we worked: leave no files behind
                try:
                    rt.storage.remove(job_id)
                except StorageUnavailable as exc:  # the janitor removes them later (stray)
                    log.warning("job %s: could not remove its files: %s", job_id, exc)
            log.warning(
                "job %s: finished, but its record was gone or no longer in progress", job_id
            )
            return {"job_id": job_id, "status": "taken"}
        rt.speed.observe(
            cur.shape,
            denoise_s=timings["denoising_s"],
            decode_encode_s=timings["decoding_s"] + timings["encoding_s"],
            fixed_s=timings["text_encoder_s"],
        )
        rt.jobs_done += 1
        log.info("job %s completed in %.2f s (density %s)", job_id, timings["total_s"], density)
        return {"job_id": job_id, "status": "completed", "timings": timings}

    # -- publishing ----------------------------------------------------------------------------
    def _publish(self, staged: Staged) -> None:
        """Publish the staged files, retrying while storage is unavailable (see the module
        docstring); `StorageFailed` once `STORAGE_RETRY_S` has passed."""
        window = self.settings.STORAGE_RETRY_S
        started = time.monotonic()
        give_up = started + window
        cur = self.cur
        assert cur is not None
        cur.deadline = max(cur.deadline, give_up + PUBLISH_WATCHDOG_MARGIN_S)
        delay = PUBLISH_FIRST_BACKOFF_S
        attempt = 0
        while True:
            attempt += 1
            try:
                staged.publish()
            except StorageUnavailable as exc:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise StorageFailed(
                        f"could not store the finished video: storage stayed unavailable for "
                        f"{time.monotonic() - started:.0f} s ({attempt} attempts, STORAGE_RETRY_S="
                        f"{window:g}); last error: {_one_line(exc)}"
                    ) from exc
                wait = min(delay, left)
                log.warning(
                    "job %s: storage unavailable (attempt %d), retrying in %.1f s for up to "
                    "%.0f s more: %s",
                    self.job_id,
                    attempt,
                    wait,
                    left,
                    _one_line(exc),
                )
                time.sleep(wait)
                delay = min(delay * 2, PUBLISH_MAX_BACKOFF_S)
                self._between_publish_attempts()
                continue
            if attempt > 1:
                log.info("job %s: stored after %d attempts", self.job_id, attempt)
            return

    def _between_publish_attempts(self) -> None:
        """A cancel, a record taken away or a shutdown past its grace still end the job while
        it waits for storage."""
        stop_at = self.rt.stop_requested_at
        if stop_at is not None and time.monotonic() - stop_at > self.settings.STOP_GRACE_S:
            raise JobRequeued(
                "worker shutting down while results storage is unavailable "
                f"(waited STOP_GRACE_S={self.settings.STOP_GRACE_S:g} s)"
            )
        try:
            cancelled = self._check_owner()
        except JobTakenAway:
            raise
        except Exception as exc:  # Redis down too: keep the files and keep trying
            log.warning("job %s: could not check the record: %s", self.job_id, exc)
            return
        if cancelled:
            raise JobCancelled()

    # -- per step ------------------------------------------------------------------------------
    def _on_step(self, done: int, total: int, hooks: FaultHooks) -> None:
        cur = self.cur
        assert cur is not None, "the job has started"
        cur.step, cur.total_steps = done, total
        if hooks.oom_at_step == done:
            import torch

            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test hook "
                f"_test.oom_at_step={done})"
            )
        if hooks.fail_at_step == done:
            raise RuntimeError(f"injected failure at step {done} (test hook _test.fail_at_step)")
        if hooks.step_delay_s:
            time.sleep(hooks.step_delay_s)
        cancelled = self._check_owner()
        self.store.mark_progress(self.job_id, done, total)
        if cancelled:
            raise JobCancelled()
        now = time.monotonic()
        if now > cur.deadline:
            s = cur.shape
            raise JobTimedOut(
                f"timed out after {now - cur.started:.1f} s at step {done} of {total}: the limit for "
                f"{s.num_frames} frames at {s.width}x{s.height} with {s.steps} steps on this worker "
                f"is {self.timeout_s:.0f} s ({self.settings.JOB_TIMEOUT_FACTOR:g}x its estimate, at "
                f"least {self.settings.JOB_TIMEOUT_MIN_S:g} s)"
            )
        if self.rt.stop_requested_at is not None:
            left = self._remaining_s(done, total, now)
            if left > self.settings.STOP_GRACE_S:
                raise JobRequeued(
                    f"worker shutting down with about {left:.0f} s of work left "
                    f"(more than STOP_GRACE_S={self.settings.STOP_GRACE_S:g})"
                )
        if done == total:
            self.store.mark_stage(self.job_id, Stage.decoding)

    def _on_frames(self, output: StreamedVideo, frames, hooks: FaultHooks) -> None:
        """Each decoded chunk: to the encoder, then the cancel check (a cancel stops the decode
        and the encoder; the GPU is decoding the next chunk meanwhile)."""
        output.write(frames)
        if hooks.decode_delay_s:
            time.sleep(hooks.decode_delay_s)
        if self._check_owner():
            raise JobCancelled()

    def _check_owner(self) -> bool:
        """One round trip: is the record still ours (else `JobTakenAway`), is the cancel flag up?"""
        pipe = self.rt.redis.pipeline(transaction=False)
        pipe.exists(cancel_key(self.job_id))
        pipe.hmget(job_key(self.job_id), "status", "worker")
        flag, (status, worker) = pipe.execute()
        status, worker = as_text(status), as_text(worker)
        if status is None:
            raise JobTakenAway("its record was deleted")
        if status != "in_progress" or worker != self.rt.name:
            raise JobTakenAway(f"its record is now {status} on {worker or 'no worker'}")
        return bool(flag)

    def _remaining_s(self, done: int, total: int, now: float) -> float:
        cur = self.cur
        assert cur is not None, "the job has started"
        per_step = (now - cur.started) / max(done, 1)
        return per_step * (total - done) + cur.shape.megapixels * self.rt.speed.s_per_mpx

    # -- endings -------------------------------------------------------------------------------
    def _requeue(self, exc: BaseException):
        reason = (
            str(exc) if isinstance(exc, JobRequeued) else f"worker stopped ({type(exc).__name__})"
        )
        if self.store.mark_requeued(self.job_id, reason=reason):
            log.warning("job %s re-queued: %s", self.job_id, reason)
            # RQ puts the job back at the front of its queue when a job returns Retry.
            return Retry(max=MAX_SHUTDOWN_REQUEUES, enqueue_at_front=True)
        return {"job_id": self.job_id, "status": "taken"}

    def _oom_message(self, exc: BaseException) -> str:
        assert self.cur is not None, "the job has started"
        s = self.cur.shape
        return (
            f"out of GPU memory generating {s.num_frames} frames at {s.width}x{s.height} "
            f"({s.tokens} latent tokens, {s.steps} steps"
            f"{', classifier-free guidance' if s.passes == 2 else ''}) on "
            f"{self.payload.get('model')}: {_one_line(exc)}. Ask for fewer frames or a "
            "smaller size."
        )

    def _sidecar(
        self,
        request: ValidatedRequest,
        attention,
        sources: dict,
        gen,
        video,
        thumb,
        timings,
        attempt,
    ) -> dict:
        rt, rec = self.rt, self.record
        return {
            "id": self.job_id,
            "created_at": time.time(),
            # What the janitor needs to put the job's record back should Redis lose it.
            "submitted_at": rec.created_at if rec else None,
            "owner": rec.owner if rec else "",
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "generator": "torch.Generator('cpu').manual_seed(seed), the initial noise",
            "request": request.model_dump(mode="json"),
            "model": rt.model(request.model).info,
            "task": request.task,
            "attention": attention.to_dict(),
            "attention_sources": sources,
            "attention_stats": gen.attention,
            "density": achieved_density(gen.attention),
            "timings": timings,
            "peak_gpu_memory_bytes": gen.peak_memory_bytes,
            "video": {
                "file": VIDEO_FILE,
                "codec": "h264",
                "pix_fmt": "yuv420p",
                "faststart": True,
                "num_frames": video.num_frames,
                "width": video.width,
                "height": video.height,
                "fps": video.fps,
                "duration_s": video.num_frames / video.fps,
                "size_bytes": video.size_bytes,
                "crf": self.settings.ENCODE_CRF,
            },
            "thumbnail": {"file": THUMBNAIL_FILE, "width": thumb[0], "height": thumb[1]},
            "worker": {
                "name": rt.name,
                "device": rt.versions.get("gpu") or rt.device,
                "attempt": attempt,
                "timeout_s": self.timeout_s,
                "speed": rt.speed.to_dict(),
            },
            "versions": rt.versions,
        }


def achieved_density(stats: dict) -> float | None:
    """The attention density a run achieved (1.0 = dense): VMoBA's measure over its sparse
    calls, and 1.0 for a run that made none (`backend: dense`, or every step dense), which
    VMoBA's statistics leave empty; None when sparse calls were not counted."""
    density = stats.get("density")
    if density is None and (stats.get("layer_calls") or {}).get("sparse") == 0:
        return 1.0
    return density


def _describe_invalid(exc: ValueError) -> str:
    """`field: message; ...` for pydantic errors, the message itself otherwise."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return _one_line("; ".join(parts))
    return _one_line(exc)


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text[:600] + ("..." if len(text) > 600 else "")
