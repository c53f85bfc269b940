"""The job function run by a real RQ worker in this process, with the tiny model and real Redis:
outputs, progress, validation, cancellation, timeouts, injected OOM and crashes, SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import threading

import av
import numpy as np
import pytest
from PIL import Image
from rq import Queue
from rq.job import Job
from worker_helpers import configure, events, run_worker, submit, wait_for

from contract.enqueue import queue_name
from contract.store import JobStore
from worker.video import mp4_top_level_boxes

# The RQ queue the tiny model's jobs go to (QUEUE_NAME "vmoba").
TINY_QUEUE = queue_name("vmoba", "tiny-wan2.1-t2v")


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return (
            frames,
            stream.codec_context.name,
            stream.codec_context.pix_fmt,
            float(stream.average_rate),
        )


def test_completed_job_has_a_playable_video_a_sidecar_and_ordered_progress(rt, redis_client):
    rng = random.Random()
    frames = rng.choice([5, 9, 13])
    width, height = rng.choice([(32, 48), (64, 32), (48, 48)])
    fps, steps, seed = rng.choice([8, 12, 16]), rng.choice([2, 3, 4]), rng.randrange(2**31)
    job_id = submit(
        redis_client,
        num_frames=frames,
        width=width,
        height=height,
        fps=fps,
        num_inference_steps=steps,
        seed=seed,
        prompt="a cat on a fence",
        attention={"select": "topk", "topk": 2},
    )
    run_worker(rt)

    rec = JobStore(redis_client).get(job_id)
    assert (rec.status, rec.stage, rec.progress, rec.error_code) == ("completed", "done", 100, None)
    assert rec.step == steps and rec.total_steps == steps and rec.attempts == 1
    assert rec.files == ["video.mp4", "thumbnail.jpg", "meta.json"]
    assert {
        "queued_s",
        "text_encoder_s",
        "denoising_s",
        "decoding_s",
        "encoding_s",
        "total_s",
    } <= set(rec.timings)
    assert 0 < rec.density < 1  # topk=2 of several blocks is sparse
    assert rec.expires_at == pytest.approx(rec.completed_at + rt.settings.RETENTION_S)

    job_dir = rt.storage.job_dir(job_id)
    video, codec, pix_fmt, rate = decode(job_dir / "video.mp4")
    assert video.shape == (frames, height, width, 3)
    assert (codec, pix_fmt, rate) == ("h264", "yuv420p", float(fps))
    boxes = mp4_top_level_boxes(job_dir / "video.mp4")
    assert boxes.index("moov") < boxes.index("mdat")
    with Image.open(job_dir / "thumbnail.jpg") as thumb:
        assert thumb.format == "JPEG" and thumb.size == (width, height)

    meta = json.loads((job_dir / "meta.json").read_text())
    assert meta["seed"] == seed and meta["prompt"] == "a cat on a fence"
    assert meta["request"]["num_frames"] == frames and meta["request"]["fps"] == fps
    assert meta["attention"]["select"] == "topk" and meta["attention"]["topk"] in (2, [2, 2, 2])
    assert meta["density"] == pytest.approx(rec.density)
    assert (
        meta["model"]["model"] == "tiny-wan2.1-t2v"
        and meta["model"]["tiny"]
        and "random" in meta["model"]["note"]
    )
    assert meta["video"]["num_frames"] == frames and meta["video"]["pix_fmt"] == "yuv420p"
    assert {"torch", "diffusers", "python"} <= set(meta["versions"])
    assert set(meta["timings"]) >= {"denoising_s", "decoding_s", "encoding_s", "total_s"}

    evs = events(redis_client, job_id)
    kinds = [e["type"] for e in evs]
    assert kinds == ["started"] + ["progress"] * steps + ["stage", "stage", "completed"]
    assert [e["step"] for e in evs if e["type"] == "progress"] == list(range(1, steps + 1))
    progress = [e["progress"] for e in evs if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 100
    assert [e["stage"] for e in evs if e["type"] == "stage"] == ["decoding", "encoding"]
    assert [e["seq"] for e in evs] == sorted({e["seq"] for e in evs})


def test_same_seed_same_video_and_missing_seed_is_resolved(rt, redis_client):
    seed = random.randrange(2**31)
    a = submit(redis_client, seed=seed)
    b = submit(redis_client, seed=seed)
    c = submit(redis_client)  # no seed: the worker picks one and records it
    run_worker(rt)
    va, vb, vc = (decode(rt.storage.job_dir(j) / "video.mp4")[0] for j in (a, b, c))
    assert np.array_equal(va, vb)
    store = JobStore(redis_client)
    rc = store.get(c)
    assert rc.status == "completed" and rc.seed is not None
    assert json.loads((rt.storage.job_dir(c) / "meta.json").read_text())["seed"] == rc.seed


# A payload the API validated, broken one field at a time (the worker decodes and trusts the
# API's limits, but never a malformed payload or a setting vmoba refuses).
VALID = {
    "model": "tiny-wan2.1-t2v",
    "task": "t2v",
    "prompt": "x",
    "negative_prompt": "",
    "seed": 1,
    "num_frames": 5,
    "width": 32,
    "height": 32,
    "num_inference_steps": 2,
    "guidance_scale": 5.0,
    "fps": 16,
    "flow_shift": 3.0,
    "attention": {},
}


@pytest.mark.parametrize(
    "raw,field",
    [
        ({**VALID, "num_frames": "ten"}, "num_frames"),
        ({k: v for k, v in VALID.items() if k != "width"}, "width"),
        ({**VALID, "colour": "red"}, "colour"),
        ({k: v for k, v in VALID.items() if k != "prompt"}, "prompt"),
        ({**VALID, "attention": {"select": "everything"}}, "select"),
        ({**VALID, "model": "wan2.1-t2v-14b"}, "serves"),
    ],
)
def test_invalid_payload_fails_with_invalid_request(rt, redis_client, raw, field):
    job_id = submit(redis_client, raw=raw)
    ok = submit(redis_client)  # the worker carries on with the next job
    run_worker(rt)
    store = JobStore(redis_client)
    rec = store.get(job_id)
    assert (rec.status, rec.error_code) == ("failed", "invalid_request")
    assert field in rec.error_message and "Traceback" not in rec.error_message
    assert not rt.storage.job_dir(job_id).exists()
    assert store.get(ok).status == "completed"


def test_cancel_while_queued(rt, redis_client):
    store = JobStore(redis_client)
    # The API's way: the record is cancelled and the RQ job too; the worker never sees it.
    a = submit(redis_client)
    assert store.mark_cancelled(a)
    Job.fetch(a, connection=redis_client).cancel()
    # Only the flag is up (the API crashed before cancelling in RQ): the worker cancels it.
    b = submit(redis_client)
    store.request_cancel(b)
    c = submit(redis_client)
    run_worker(rt)
    for job_id in (a, b):
        rec = store.get(job_id)
        assert (rec.status, rec.error_code, rec.attempts) == ("cancelled", "cancelled", 0)
        assert "started" not in [e["type"] for e in events(redis_client, job_id)]
        assert not rt.storage.job_dir(job_id).exists()
    assert store.get(c).status == "completed"


def test_cancel_while_running_stops_within_one_step(rt, redis_client):
    store = JobStore(redis_client)
    steps = 8
    job_id = submit(redis_client, num_inference_steps=steps, test_hooks={"step_delay_s": 0.15})
    after = submit(redis_client)
    seen = {}

    def cancel_at_step_2():
        def step():
            rec = store.get(job_id)
            return rec and rec.step >= 2 and rec.step

        seen["step"] = wait_for(step, what="step 2")
        store.request_cancel(job_id)

    thread = threading.Thread(target=cancel_at_step_2)
    thread.start()
    run_worker(rt)
    thread.join()
    rec = store.get(job_id)
    assert (rec.status, rec.error_code) == ("cancelled", "cancelled")
    assert rec.step <= seen["step"] + 1 < steps  # stopped within one step of the flag
    kinds = [e.get("stage") for e in events(redis_client, job_id)]
    assert "decoding" not in kinds and "encoding" not in kinds  # the VAE decode was skipped
    assert not rt.storage.job_dir(job_id).exists()
    assert os.listdir(rt.storage.staging_dir) == [] if rt.storage.staging_dir.exists() else True
    assert store.get(after).status == "completed"


def test_timeout_fails_with_code(rt, redis_client):
    configure(rt, JOB_TIMEOUT_MIN_S=0.3, JOB_TIMEOUT_FACTOR=1.0)
    # A fast measured speed (as on an idle machine): the limit is the 0.3 s floor.
    rt.speed.s_per_unit, rt.speed.s_per_mpx, rt.speed.fixed_s = 1e-7, 1e-3, 0.01
    job_id = submit(redis_client, num_inference_steps=6, test_hooks={"step_delay_s": 0.4})
    run_worker(rt)
    rec = JobStore(redis_client).get(job_id)
    assert (rec.status, rec.error_code) == ("failed", "timeout")
    assert rec.step < 6 and "limit" in rec.error_message and "32x32" in rec.error_message
    assert not rt.storage.job_dir(job_id).exists()


def test_injected_oom_fails_only_that_job_then_the_worker_restarts(rt, redis_client):
    store = JobStore(redis_client)
    oom = submit(
        redis_client,
        num_frames=9,
        width=48,
        height=32,
        num_inference_steps=3,
        test_hooks={"oom_at_step": 2},
    )
    nxt = submit(redis_client)
    run_worker(rt)  # stops after the OOM job: it wants a fresh process
    rec = store.get(oom)
    assert (rec.status, rec.error_code) == ("failed", "gpu_oom")
    assert "9 frames at 48x32" in rec.error_message and "Tried to allocate" in rec.error_message
    assert rt.restart_reason == "gpu_oom"
    assert store.get(nxt).status == "queued"  # untouched, waiting for the restarted worker
    rt.restart_reason = None  # what a fresh process starts with
    run_worker(rt)
    assert store.get(nxt).status == "completed"


def test_crash_in_the_pipeline_fails_with_internal_error_and_the_worker_goes_on(rt, redis_client):
    store = JobStore(redis_client)
    bad = submit(redis_client, test_hooks={"fail_at_step": 1})
    good = submit(redis_client)
    run_worker(rt)
    rec = store.get(bad)
    assert (rec.status, rec.error_code) == ("failed", "internal_error")
    assert "injected failure" in rec.error_message
    assert store.get(good).status == "completed"


def _sigterm_at_step(store, job_id, step):
    def go():
        wait_for(lambda: (store.get(job_id).step or 0) >= step, what=f"step {step}")
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_sigterm_requeues_a_long_job_at_the_front(rt, redis_client):
    configure(rt, STOP_GRACE_S=0)  # any work left is too much: re-queue
    store = JobStore(redis_client)
    long_job = submit(redis_client, num_inference_steps=8, test_hooks={"step_delay_s": 0.1})
    waiting = submit(redis_client)
    thread = _sigterm_at_step(store, long_job, 2)
    run_worker(rt, burst=False)  # returns once the worker has stopped
    thread.join()
    rec = store.get(long_job)
    assert (rec.status, rec.stage, rec.progress, rec.worker) == ("queued", "queued", 0, None)
    assert "requeued" in [e["type"] for e in events(redis_client, long_job)]
    assert Queue(TINY_QUEUE, connection=redis_client).job_ids == [long_job, waiting]  # at the front
    assert store.get(waiting).status == "queued"  # the stopping worker took nothing else
    # A fresh worker completes it: nothing was lost.
    rt.stop_requested_at = None
    run_worker(rt)
    rec = store.get(long_job)
    assert (rec.status, rec.attempts) == ("completed", 2)
    assert store.get(waiting).status == "completed"


def test_sigterm_lets_a_short_job_finish(rt, redis_client):
    configure(rt, STOP_GRACE_S=600)
    store = JobStore(redis_client)
    job_id = submit(redis_client, num_inference_steps=4, test_hooks={"step_delay_s": 0.1})
    waiting = submit(redis_client)
    thread = _sigterm_at_step(store, job_id, 1)
    run_worker(rt, burst=False)
    thread.join()
    assert store.get(job_id).status == "completed"
    assert store.get(waiting).status == "queued"
    assert Queue(TINY_QUEUE, connection=redis_client).job_ids == [waiting]


def test_timeout_comes_from_the_request_size_and_measured_speed(rt, redis_client):
    from contract.speed import Shape

    configure(rt, JOB_TIMEOUT_MIN_S=0.001, JOB_TIMEOUT_FACTOR=4.0)
    rt.speed.s_per_unit, rt.speed.s_per_mpx, rt.speed.fixed_s = 0.01, 2.0, 1.0
    small = Shape(5, 32, 32, 2, 5.0)
    big = Shape(9, 48, 64, 3, 5.0)
    expected = {s: 4.0 * rt.speed.estimate_s(s) for s in (small, big)}
    ids = {
        s: submit(
            redis_client,
            num_frames=s.num_frames,
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
        )
        for s in (small, big)
    }
    before = rt.speed.samples
    run_worker(rt)
    for shape, job_id in ids.items():
        meta = json.loads((rt.storage.job_dir(job_id) / "meta.json").read_text())
        if shape == small:  # the first job ran with the speed set above
            assert meta["worker"]["timeout_s"] == pytest.approx(expected[shape])
    assert expected[big] > 2 * expected[small]
    assert rt.speed.samples == before + 2  # each completed job refines the measured speed


def test_rq_backstop_timeout_also_ends_as_timeout(rt, redis_client):
    """RQ's own `job_timeout` (the API's generous backstop) still leaves a clean record."""
    configure(rt, JOB_TIMEOUT_MIN_S=600)
    job_id = submit(
        redis_client, job_timeout=1, num_inference_steps=6, test_hooks={"step_delay_s": 0.5}
    )
    run_worker(rt)
    rec = JobStore(redis_client).get(job_id)
    assert (rec.status, rec.error_code) == ("failed", "timeout")
    assert "1 seconds" in rec.error_message


def test_flow_shift_changes_the_schedule_and_vmoba_still_runs(rt, redis_client):
    """A request's flow_shift applies for its call only, on the same scheduler the VMoBA handle
    follows (a swapped scheduler would leave every step 'dense')."""
    seed = random.randrange(2**31)
    base = submit(redis_client, seed=seed, num_inference_steps=4)
    shifted = submit(redis_client, seed=seed, num_inference_steps=4, flow_shift=7.0)
    run_worker(rt)
    videos = [decode(rt.storage.job_dir(j) / "video.mp4")[0] for j in (base, shifted)]
    assert not np.array_equal(*videos), f"seed {seed}: flow_shift changed nothing"
    meta = json.loads((rt.storage.job_dir(shifted) / "meta.json").read_text())
    stats = meta["attention_stats"]
    assert meta["request"]["flow_shift"] == 7.0
    # Every step seen, the first quarter dense (the default dense_steps), the rest sparse.
    assert (stats["steps"], stats["dense_steps"]) == (4, 1), (seed, stats)
    assert stats["layer_calls"]["sparse"] > 0, (seed, stats)
    scheduler = rt.model("tiny-wan2.1-t2v").pipes["t2v"].scheduler
    assert scheduler.config.flow_shift == 3.0  # restored after the call


@pytest.mark.parametrize("attention", [{"backend": "dense"}, {"dense_steps": 1.0}])
def test_a_dense_run_reports_density_one(rt, redis_client, attention):
    """No sparse attention call at all (dense backend, or every step dense) is density 1.0,
    in the record and in the sidecar."""
    job_id = submit(redis_client, attention=attention)
    run_worker(rt)
    rec = JobStore(redis_client).get(job_id)
    assert (rec.status, rec.density) == ("completed", 1.0)
    meta = json.loads((rt.storage.job_dir(job_id) / "meta.json").read_text())
    assert meta["density"] == 1.0 and meta["attention_stats"]["layer_calls"]["sparse"] == 0


def ffmpeg_children() -> list[int]:
    """Live ffmpeg processes this test process started (the job's encoder)."""
    from worker.video import ffmpeg_exe

    exe, pids = ffmpeg_exe(), []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and argv0 == exe:
            pids.append(int(entry))
    return pids


def _once_encoding(action):
    """A thread that waits for the job's ffmpeg (the decode has handed on its first frames)
    and then does `action(pid)`; `.seen` is the pid."""

    def go():
        thread.seen = wait_for(ffmpeg_children, what="the job's ffmpeg")[0]
        action(thread.seen)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def _no_files_left(rt, job_id):
    assert not rt.storage.job_dir(job_id).exists()
    staging = rt.storage.staging_dir
    assert not staging.exists() or os.listdir(staging) == []


def test_cancel_during_the_streamed_decode_kills_ffmpeg_and_leaves_no_file(rt, redis_client):
    store = JobStore(redis_client)
    # 13 frames: 4 chunks of decoded frames, each followed by a 0.3 s pause
    job_id = submit(redis_client, num_frames=13, test_hooks={"decode_delay_s": 0.3})
    after = submit(redis_client)
    thread = _once_encoding(lambda _pid: store.request_cancel(job_id))
    run_worker(rt)
    thread.join()
    rec = store.get(job_id)
    assert (rec.status, rec.error_code) == ("cancelled", "cancelled")
    stages = [e.get("stage") for e in events(redis_client, job_id)]
    assert "decoding" in stages and "encoding" not in stages  # stopped inside the decode
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(thread.seen, 0)
    _no_files_left(rt, job_id)
    assert store.get(after).status == "completed" and ffmpeg_children() == []


def test_ffmpeg_dying_mid_stream_fails_the_job_cleanly_and_the_worker_goes_on(rt, redis_client):
    store = JobStore(redis_client)
    job_id = submit(redis_client, num_frames=13, test_hooks={"decode_delay_s": 0.3})
    after = submit(redis_client)
    thread = _once_encoding(lambda pid: os.kill(pid, signal.SIGKILL))
    run_worker(rt)
    thread.join()
    rec = store.get(job_id)
    assert (rec.status, rec.error_code) == ("failed", "internal_error")
    assert rec.error_message.startswith("EncodeError: ffmpeg"), rec.error_message
    _no_files_left(rt, job_id)
    assert store.get(after).status == "completed" and ffmpeg_children() == []
