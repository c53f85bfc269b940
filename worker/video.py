"""Turn decoded frames into files every browser plays: an H.264 mp4 and a JPEG thumbnail.

Frames are `[F, H, W, 3]` (or `[1, F, H, W, 3]`, what `WanPipeline(output_type="np")` returns),
either float in `[0, 1]` or `uint8`. The mp4 is H.264 (libx264), `yuv420p` (the only chroma
layout every browser decodes) with the `moov` atom moved to the front (`+faststart`) so playback
and HTTP Range seeking start before the whole file has arrived. Encoding pipes raw RGB into the
static ffmpeg that `imageio-ffmpeg` ships, so no system ffmpeg is needed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# x264 quality: 18 is visually near-lossless for generated video at a few MB per 5 s of 480p.
DEFAULT_CRF = 18
# "medium" is x264's default; faster presets cost size, slower ones cost seconds per job.
DEFAULT_PRESET = "medium"
# Longest side of the thumbnail in pixels (the OpenAI `variant=thumbnail` is a preview image).
THUMBNAIL_MAX_PX = 512
THUMBNAIL_QUALITY = 90


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
    import torch

    if video.ndim != 5 or video.shape[0] != 1 or video.shape[2] != 3:
        raise ValueError(f"expected one video [1, F, 3, H, W], got shape {tuple(video.shape)}")
    x = video[0].float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("frames contain NaN or infinite values")
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy())


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
    if not (fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    video = to_uint8_frames(frames)
    num_frames, height, width, _ = video.shape
    path = Path(path)
    cmd = [
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
    try:
        proc = subprocess.run(cmd, input=video.tobytes(), capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise EncodeError(f"ffmpeg did not finish within {timeout_s} s") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise EncodeError(f"ffmpeg exited with {proc.returncode}: {tail}")
    return EncodedVideo(
        path=path,
        num_frames=num_frames,
        width=width + width % 2,
        height=height + height % 2,
        fps=float(fps),
        size_bytes=path.stat().st_size,
    )


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
