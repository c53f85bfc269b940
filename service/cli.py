"""`vmoba generate "a prompt" -o out.mp4 [options]`: submit, follow the progress, save the video.

```bash
vmoba generate "a red fox running through snow" -o fox.mp4
vmoba generate "waves at dusk" -o waves.mp4 --frames 33 --size 832x480 --steps 30 --seed 7 \\
      --attention dense --url http://gpu-box:8000 --api-key "$KEY"
```

The progress bar is fed by the job's event stream (`GET /jobs/{id}/events`); if the stream
breaks it reconnects with `Last-Event-ID`, and falls back to polling. Ctrl-C cancels the job on the
server. Exit codes: 0 saved, 1 the job failed or was cancelled, 2 the request was refused.
`VMOBA_URL` and `VMOBA_API_KEY` set the defaults of `--url` and `--api-key`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
BAR_WIDTH = 30
SUBMIT_ATTEMPTS = 5


class Refused(Exception):
    """The server answered with an error (message from its error envelope)."""


def _error_message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:300] or r.reason_phrase


class ProgressBar:
    """A one-line bar on a terminal; plain lines (on change only) otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def show(self, job: dict) -> None:
        pct = int(job.get("progress") or 0)
        status, stage = job.get("status", "?"), job.get("stage", "")
        if status == "queued":
            pos = job.get("queue_position")
            what = f"queued (position {pos})" if pos else "queued"
        elif stage == "denoising" and job.get("total_steps"):
            what = f"denoising step {job.get('step', 0)}/{job['total_steps']}"
        else:
            what = stage or status
        filled = BAR_WIDTH * pct // 100
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {pct:3d}% {what}"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line.ljust(72))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Optional[int], dict]]:
    """`(event, id, data)` from the lines of an event stream."""
    block: dict = {}
    for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if "data" in block:
                yield block.get("event", "message"), block.get("id"), json.loads(block["data"])
            block = {}
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            with contextlib.suppress(ValueError):
                block["id"] = int(value)
        elif name in ("event", "data"):
            block[name] = value
    if "data" in block:
        yield block.get("event", "message"), block.get("id"), json.loads(block["data"])


class Client:
    """The few calls the CLI makes."""

    def __init__(self, url: str, api_key: Optional[str], timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def submit(self, body: dict) -> dict:
        """POST /generate with an Idempotency-Key, so retries after a lost answer are safe;
        waits out 429 (queue full) and 503 as told by Retry-After."""
        key = uuid.uuid4().hex
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                r = self.http.post("/generate", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as e:
                if attempt == SUBMIT_ATTEMPTS - 1:
                    raise Refused(f"cannot reach {self.http.base_url}: {e}") from None
                time.sleep(1 + attempt)
                continue
            if r.status_code == 202:
                return r.json()
            if r.status_code in (429, 503) and attempt < SUBMIT_ATTEMPTS - 1:
                wait = float(r.headers.get("retry-after", 5))
                print(f"server busy ({_error_message(r)}); retrying in {wait:g} s", file=sys.stderr)
                time.sleep(wait)
                continue
            raise Refused(f"{r.status_code}: {_error_message(r)}")
        raise Refused("gave up submitting")

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/jobs/{job_id}")
        if r.status_code != 200:
            raise Refused(f"{r.status_code}: {_error_message(r)}")
        return r.json()

    def cancel(self, job_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.http.post(f"/jobs/{job_id}/cancel", timeout=5)

    def follow(self, job_id: str, bar: ProgressBar) -> dict:
        """Follow the job's events until it ends; returns the final job object."""
        last_id: Optional[int] = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
            event = ""
            try:
                with self.http.stream(
                    "GET",
                    f"/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30, read=120),
                ) as r:
                    if r.status_code != 200:
                        raise Refused(f"{r.status_code}: {r.read().decode()[:300]}")
                    for event, id_, data in parse_sse(r.iter_lines()):
                        last_id = id_ if id_ is not None else last_id
                        if event == "unavailable":  # Redis is restarting: resume shortly
                            break
                        if event == "deleted":
                            raise Refused(f"job {job_id} was deleted")
                        if event in ("snapshot", "completed", "failed", "cancelled"):
                            bar.show(data)
                            if data.get("status") in ("completed", "failed", "cancelled"):
                                return data
                        else:
                            bar.show(data)
                failures = 0
                if event == "unavailable":
                    time.sleep(1)
                    continue
            except (httpx.TransportError, json.JSONDecodeError):
                failures += 1
                if failures > 5:  # streams keep breaking (a proxy?): poll instead
                    return self.poll(job_id, bar)
                time.sleep(min(2**failures, 10))
            job = self.job(job_id)  # the stream ended without a final state: check
            if job["status"] in ("completed", "failed", "cancelled"):
                bar.show(job)
                return job

    def poll(self, job_id: str, bar: ProgressBar) -> dict:
        while True:
            r = self.http.get(f"/jobs/{job_id}")
            job = r.json()
            bar.show(job)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(int(r.headers.get("openai-poll-after-ms", 1000)) / 1000)

    def download(self, job_id: str, out: Path) -> int:
        """Stream the mp4 to `out` (written next to it first, then renamed). A redirect to
        object storage (`STORAGE_REDIRECT=1`) is followed; httpx drops the API key on the way."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        size = 0
        with self.http.stream("GET", f"/jobs/{job_id}/video", follow_redirects=True) as r:
            if r.status_code != 200:
                raise Refused(f"{r.status_code}: {r.read().decode()[:300]}")
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    size += len(chunk)
        os.replace(tmp, out)
        return size


def build_body(args) -> dict:
    body: dict = {"prompt": args.prompt}
    for field, value in (
        ("negative_prompt", args.negative),
        ("seed", args.seed),
        ("num_frames", args.frames),
        ("num_inference_steps", args.steps),
        ("guidance_scale", args.guidance),
        ("fps", args.fps),
    ):
        if value is not None:
            body[field] = value
    if args.size:
        try:
            w, h = args.size.lower().split("x")
            body["width"], body["height"] = int(w), int(h)
        except ValueError:
            raise SystemExit(
                f"--size must be WIDTHxHEIGHT, e.g. 832x480; got {args.size!r}"
            ) from None
    attention = {}
    for field, value in (
        ("backend", args.attention),
        ("select", args.select),
        ("threshold", args.threshold),
        ("topk", args.topk),
        ("dense_steps", args.dense_steps),
    ):
        if value is not None:
            attention[field] = value
    if attention:
        body["attention"] = attention
    return body


def cmd_generate(args) -> int:
    client = Client(args.url, args.api_key)
    bar = ProgressBar()
    try:
        job = client.submit(build_body(args))
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    job_id = job["id"]
    note = f" [{job['model_note']}]" if job.get("model_note") else ""
    print(f"job {job_id} (seed {job['seed']}, model {job['model']}){note}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        final = client.follow(job_id, bar)
    except KeyboardInterrupt:
        bar.done()
        client.cancel(job_id)
        print(f"interrupted: cancelled job {job_id}", file=sys.stderr)
        return 130
    except Refused as e:
        bar.done()
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar.done()
    if final["status"] != "completed":
        err = final.get("error") or {}
        print(
            f"job {job_id} {final['status']}: {err.get('code')}: {err.get('message')}",
            file=sys.stderr,
        )
        return 1
    out = Path(args.output)
    size = client.download(job_id, out)
    timings = final.get("timings") or {}
    density = final.get("density")
    summary = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items() if k.endswith("_s"))
    extra = f", attention density {density:.3f}" if density is not None else ""
    print(f"saved {out} ({size} bytes){extra}; {summary}", file=sys.stderr)
    if args.json:
        print(json.dumps(final, indent=2))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmoba", description="vmoba-serve command-line client")
    p.add_argument(
        "--url",
        default=os.environ.get("VMOBA_URL", DEFAULT_URL),
        help=f"server URL (env VMOBA_URL, default {DEFAULT_URL})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("VMOBA_API_KEY"),
        help="bearer API key (env VMOBA_API_KEY)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from a prompt and save it")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.mp4", help="where to save the mp4")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--seed", type=int)
    g.add_argument("--frames", type=int, help="number of frames, 4k+1 (e.g. 17, 33, 81)")
    g.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (e.g. 832x480)")
    g.add_argument("--steps", type=int, help="denoising steps")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--fps", type=int)
    g.add_argument("--attention", choices=["vmoba", "dense"], help="attention backend")
    g.add_argument("--select", choices=["threshold_global", "threshold_query", "topk"])
    g.add_argument("--threshold", type=float, help="VMoBA threshold tau in [0, 1]")
    g.add_argument("--topk", type=int, help="blocks per query for --select topk")
    g.add_argument("--dense-steps", type=float, help="fraction of steps run dense, in [0, 1]")
    g.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    g.add_argument("--json", action="store_true", help="print the final job object")
    # --url and --api-key are accepted after the subcommand too.
    g.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--api-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
