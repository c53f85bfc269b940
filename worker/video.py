"""Turn decoded frames into files every browser plays: an H.264 mp4 and a JPEG thumbnail.

Frames are `[F, H, W, 3]` (or `[1, F, H, W, 3]`, what `WanPipeline(output_type="np")` returns),
either float in `[0, 1]` or `uint8`. The mp4 is H.264 (libx264), `yuv420p` (the only chroma
layout every browser decodes) with the `moov` atom moved to the front (`+faststart`) so playback
and HTTP Range seeking start before the whole file has arrived. Encoding pipes raw RGB into the
static ffmpeg that `imageio-ffmpeg` ships, so no system ffmpeg is needed. `Mp4Writer` takes the
frames a chunk at a time while they are still being decoded (`worker.decode`); `encode_mp4`
writes frames that are all there.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# x264 quality: 18 is visually near-lossless for generated video at a few MB per 5 s of 480p.
DEFAULT_CRF = 18
# "medium" is x264's default; faster presets cost size, slower ones cost seconds per job.
DEFAULT_PRESET = "medium"
# Longest side of the thumbnail in pixels (the OpenAI `variant=thumbnail` is a preview image).
THUMBNAIL_MAX_PX = 512
THUMBNAIL_QUALITY = 90
# How long a failed write waits for ffmpeg to exit, to report its error message.
FAILURE_WAIT_S = 5.0


class EncodeError(RuntimeError):
    """ffmpeg failed; the message carries the tail of its stderr."""


@dataclass(frozen=True)
class EncodedVideo:
    """What was written: path, frame count, size and rate, bytes."""

    path: Path
    num_frames: int
    width: int
    height: int
    fps: float
    size_bytes: int


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg (it has libx264)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def to_uint8_frames(frames) -> np.ndarray:
    """Frames as a C-contiguous `uint8` array `[F, H, W, 3]`.

    Accepts `[F, H, W, 3]` or a batch of one `[1, F, H, W, 3]`, `uint8` or float in `[0, 1]`
    (values outside are clipped), numpy or anything with `.numpy()` (CPU torch tensors).
    """
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise ValueError(
                f"expected one video, got a batch of {arr.shape[0]} (shape {arr.shape})"
            )
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] or [1, F, H, W, 3], got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise ValueError("no frames to encode")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("frames contain NaN or infinite values")
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def device_frames_to_uint8(video) -> np.ndarray:
    """`WanPipeline(output_type="pt")` frames, `[1, F, 3, H, W]` in `[0, 1]` on any device, as
    `to_uint8_frames` gives them (`[F, H, W, 3]` `uint8`, the same rounding), converted on that
    device: a quarter of the bytes of float frames cross to the host, and the GPU rounds."""
    frames, finite = frames_to_uint8_on_device(video)
    if not bool(finite):
        raise ValueError("frames contain NaN or infinite values")
    return frames.cpu().numpy()


def frames_to_uint8_on_device(video):
    """The conversion of `device_frames_to_uint8` without leaving the device or waiting for it:
    `(frames, finite)`, C-contiguous `uint8` `[F, H, W, 3]` and a 0-d bool tensor saying whether
    every value was finite (the caller reads it when the frames reach the host)."""
    import torch

    if video.ndim != 5 or video.shape[0] != 1 or video.shape[2] != 3:
        raise ValueError(f"expected one video [1, F, 3, H, W], got shape {tuple(video.shape)}")
    x = video[0].float()
    finite = torch.isfinite(x).all()
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous(), finite


def ffmpeg_command(
    path: Path, *, width: int, height: int, fps: float, crf: int, preset: str
) -> list[str]:
    """The encoder of every mp4 we write: raw RGB frames of `width x height` on stdin, an
    H.264/yuv420p faststart mp4 at `path` (odd sides padded by one black pixel)."""
    return [
        ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{width}x{height}",
        "-framerate",
        f"{fps}",
        "-i",
        "pipe:0",
        "-an",
        "-vf",
        "pad=ceil(iw/2)*2:ceil(ih/2)*2",
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-crf",
        str(int(crf)),
        "-pix_fmt",
        "yuv420p",
        "-profile:v",
        "high",
        "-movflags",
        "+faststart",
        # ffmpeg picks the container from the extension; be explicit so `.part` names work.
        "-f",
        "mp4",
        str(path),
    ]


class Mp4Writer:
    """An mp4 encoded while its frames are still being made: ffmpeg (`ffmpeg_command`) starts at
    the first `write` and reads the frames from a pipe that a thread of this writer feeds, so
    `write` returns at once and the caller (the GPU decoding the next frames) is not held up by
    the encoder.

    ```python
    with Mp4Writer(path, fps=16) as mp4:
        for chunk in chunks:        # uint8 [f, H, W, 3] (see to_uint8_frames), all one size
            mp4.write(chunk)        # kept by reference until written: do not change it after
        video = mp4.finish()        # EncodedVideo; EncodeError if ffmpeg failed
    ```

    Leaving the block without `finish()` (an exception, a cancel), or a failed `finish()`,
    kills ffmpeg and removes the partial file.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fps: float,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
    ):
        if not (fps > 0):
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.path = Path(path)
        self.fps, self.crf, self.preset = float(fps), crf, preset
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (height, width) of the first frames
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._feeder: threading.Thread | None = None
        self._pipe_error: OSError | None = None  # the feeder's, when ffmpeg stopped reading
        self._done = False

    @property
    def pid(self) -> int | None:
        """ffmpeg's process id once started."""
        return self._proc.pid if self._proc is not None else None

    def write(self, frames) -> None:
        """Queue `frames` (`[f, H, W, 3]` or `[1, f, H, W, 3]`, see `to_uint8_frames`) for the
        encoder. `EncodeError` if ffmpeg has already failed."""
        video = to_uint8_frames(frames)
        height, width = video.shape[1:3]
        if self._size is None:
            self._start(width=width, height=height)
        elif (height, width) != self._size:
            h, w = self._size
            raise ValueError(f"frames of {width}x{height} after frames of {w}x{h}")
        assert self._proc is not None
        if self._pipe_error is not None or self._proc.poll() not in (None, 0):
            raise self._failure()
        self._queue.put(video)
        self.num_frames += video.shape[0]

    def finish(self, *, timeout_s: float | None = None) -> EncodedVideo:
        """Wait for ffmpeg to write the file (at most `timeout_s`); `EncodeError` on failure."""
        if self._proc is None:
            raise ValueError("no frames to encode")
        self._queue.put(None)
        try:
            code = self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.abort()
            raise EncodeError(f"ffmpeg did not finish within {timeout_s} s") from exc
        assert self._feeder is not None
        self._feeder.join()
        if code != 0 or self._pipe_error is not None:
            error = self._failure()
            self.abort()
            raise error
        self._done = True
        self._stderr.close()
        assert self._size is not None
        height, width = self._size
        return EncodedVideo(
            path=self.path,
            num_frames=self.num_frames,
            width=width + width % 2,
            height=height + height % 2,
            fps=self.fps,
            size_bytes=self.path.stat().st_size,
        )

    def abort(self) -> None:
        """Kill ffmpeg, wait for it and the feeder, remove the partial file."""
        if self._done:
            return
        self._done = True
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._queue.put(None)  # wakes a feeder waiting for frames; a writing one got EPIPE
            assert self._feeder is not None
            self._feeder.join()
            self._stderr.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()

    def _start(self, *, width: int, height: int) -> None:
        self._size = (height, width)
        cmd = ffmpeg_command(
            self.path, width=width, height=height, fps=self.fps, crf=self.crf, preset=self.preset
        )
        # stderr to a file: a pipe nobody reads could fill up and stall ffmpeg. Closed by
        # finish() or abort(), not by a with-block: it lives as long as the encoder.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        self._feeder = threading.Thread(target=self._feed, name="mp4-writer", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            while (video := self._queue.get()) is not None:
                stdin.write(memoryview(video).cast("B"))
        except OSError as exc:  # ffmpeg exited (or was killed) before reading everything
            self._pipe_error = exc
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _failure(self) -> EncodeError:
        """What went wrong, with the tail of ffmpeg's stderr (once it has exited)."""
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=FAILURE_WAIT_S)
        except subprocess.TimeoutExpired:
            return EncodeError(f"ffmpeg stopped reading its input: {self._pipe_error}")
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        return EncodeError(f"ffmpeg exited with {code}: {tail}")


def encode_mp4(
    frames,
    path: str | Path,
    *,
    fps: float,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    timeout_s: float | None = None,
) -> EncodedVideo:
    """Encode `frames` (`[F, H, W, 3]`, see `to_uint8_frames`) into an H.264/yuv420p faststart mp4.

    Odd widths or heights (which yuv420p cannot hold) are padded by one black pixel; our requests
    are multiples of 16, so this only matters to other callers. Raises `EncodeError` on failure.
    """
    with Mp4Writer(path, fps=fps, crf=crf, preset=preset) as mp4:
        mp4.write(frames)
        return mp4.finish(timeout_s=timeout_s)


def write_thumbnail(frames, path: str | Path, *, max_px: int = THUMBNAIL_MAX_PX) -> tuple[int, int]:
    """Write the middle frame as a JPEG no larger than `max_px` on its longest side.

    Returns the thumbnail's `(width, height)`.
    """
    from PIL import Image

    video = to_uint8_frames(frames)
    image = Image.fromarray(video[video.shape[0] // 2])
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    image.save(Path(path), format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return image.size


def mp4_top_level_boxes(path: str | Path) -> list[str]:
    """Names of the top-level ISO-BMFF boxes in order, e.g. `['ftyp', 'moov', 'mdat']`.

    `+faststart` means `moov` comes before `mdat` (what lets a browser play before the download ends).
    """
    names = []
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                break
            size = int.from_bytes(header[:4], "big")
            name = header[4:8].decode("latin-1")
            header_len = 8
            if size == 1:  # 64-bit size follows
                size = int.from_bytes(f.read(8), "big")
                header_len = 16
            elif size == 0:  # box runs to the end of the file
                names.append(name)
                break
            if size < header_len:
                raise ValueError(f"{path}: corrupt box {name!r} of size {size}")
            names.append(name)
            f.seek(size - header_len, 1)
    return names
