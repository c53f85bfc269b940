"""mp4 and thumbnail encoding, checked by decoding the files with PyAV and Pillow."""

from __future__ import annotations

import os
import signal
import time

import av
import numpy as np
import pytest
from PIL import Image

from worker.video import (
    EncodeError,
    Mp4Writer,
    device_frames_to_uint8,
    encode_mp4,
    mp4_top_level_boxes,
    to_uint8_frames,
    write_thumbnail,
)


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate),
            "frames": len(frames),
        }
    return np.stack(frames), info


def smooth_video(rng, frames, height, width):
    """Random but smooth frames (H.264 would smear per-pixel noise beyond any fair tolerance)."""
    coarse = rng.random((frames, max(1, height // 8), max(1, width // 8), 3))
    return coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]


@pytest.mark.parametrize(
    "frames,height,width,fps", [(17, 64, 96, 16), (5, 48, 32, 8), (9, 32, 32, 24)]
)
def test_mp4_decodes_with_requested_shape_rate_and_format(tmp_path, frames, height, width, fps):
    rng = np.random.default_rng()
    video = smooth_video(rng, frames, height, width)
    out = encode_mp4(
        video[None], tmp_path / "v.mp4", fps=fps
    )  # a batch of one, as diffusers returns
    decoded, info = decode(out.path)
    assert info == {
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "width": width,
        "height": height,
        "fps": float(fps),
        "frames": frames,
    }
    assert (out.num_frames, out.width, out.height, out.size_bytes) == (
        frames,
        width,
        height,
        (tmp_path / "v.mp4").stat().st_size,
    )
    # Content survives: lossy, but close to the source on smooth frames.
    error = np.abs(decoded.astype(np.float64) - to_uint8_frames(video).astype(np.float64)).mean()
    assert error < 8.0, error
    boxes = mp4_top_level_boxes(out.path)
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # +faststart


def test_frames_are_distinct_in_order(tmp_path):
    # Frame i is uniformly grey level 20*i: order and count must survive the round trip.
    levels = np.arange(9) * 20
    video = np.broadcast_to(levels[:, None, None, None], (9, 32, 48, 3)).astype(np.uint8)
    decoded, _ = decode(encode_mp4(video, tmp_path / "g.mp4", fps=16).path)
    means = decoded.reshape(9, -1).mean(axis=1)
    assert np.allclose(means, levels, atol=3), means


def test_odd_size_is_padded_to_even(tmp_path):
    video = np.zeros((3, 31, 45, 3), dtype=np.uint8)
    out = encode_mp4(video, tmp_path / "odd.mp4", fps=8)
    _, info = decode(out.path)
    assert (info["width"], info["height"]) == (46, 32) == (out.width, out.height)


def test_thumbnail_is_the_middle_frame_scaled(tmp_path):
    video = np.zeros((5, 64, 128, 3), dtype=np.uint8)
    video[2] = 200
    size = write_thumbnail(video, tmp_path / "t.jpg", max_px=64)
    assert size == (64, 32)
    with Image.open(tmp_path / "t.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 32)
        assert abs(np.asarray(image).mean() - 200) < 3


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 8, 8)), "shape"),
        (np.zeros((2, 3, 8, 8, 3)), "batch of 2"),
        (np.zeros((0, 8, 8, 3)), "no frames"),
        (np.full((1, 8, 8, 3), np.nan), "NaN"),
        (np.zeros((1, 8, 8, 3), dtype=np.int32), "dtype"),
    ],
)
def test_bad_frames_are_rejected_with_the_reason(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        encode_mp4(bad, tmp_path / "x.mp4", fps=8)


def test_float_frames_are_clipped_and_scaled():
    frames = np.array([[[[-0.5, 0.5, 1.5]]]])
    assert to_uint8_frames(frames).tolist() == [[[[0, 128, 255]]]]


def test_device_frames_to_uint8_matches_the_host_conversion():
    """`[1, F, 3, H, W]` frames (what `output_type="pt"` gives) -> the same uint8 frames as
    `to_uint8_frames` of the `[F, H, W, 3]` floats, out-of-range values and halves included."""
    import torch

    video = torch.rand(1, 3, 3, 5, 7) * 1.4 - 0.2
    video[0, 0, 0, 0, :3] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255])
    host = to_uint8_frames(video[0].permute(0, 2, 3, 1).numpy())
    out = device_frames_to_uint8(video)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 7, 3) and out.flags.c_contiguous
    assert np.array_equal(out, host)
    assert np.array_equal(
        device_frames_to_uint8(video.bfloat16()),
        to_uint8_frames(video.bfloat16()[0].permute(0, 2, 3, 1)),
    )


def test_device_frames_to_uint8_refuses_bad_frames():
    import torch

    with pytest.raises(ValueError, match="NaN"):
        device_frames_to_uint8(torch.full((1, 2, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="one video"):
        device_frames_to_uint8(torch.rand(2, 2, 3, 4, 4))


def process_gone(pid: int) -> bool:
    """True once `pid` has exited and been reaped (no zombie left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_mp4_writer_takes_chunks_and_gives_the_same_video_as_encode_mp4(tmp_path):
    rng = np.random.default_rng()
    video = to_uint8_frames(smooth_video(rng, 13, 48, 80))
    whole = encode_mp4(video, tmp_path / "whole.mp4", fps=12)
    with Mp4Writer(tmp_path / "chunks.mp4", fps=12) as mp4:
        for chunk in np.split(video, [1, 5, 9]):  # as the VAE decodes: 1, then 4 a latent frame
            mp4.write(chunk)
        out = mp4.finish()
    assert process_gone(mp4.pid)
    decoded, info = decode(out.path)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (13, 80, 48, 12.0)
    assert (out.num_frames, out.width, out.height) == (13, 80, 48)
    assert out.size_bytes == out.path.stat().st_size
    assert np.array_equal(decoded, decode(whole.path)[0])  # one command, one result
    boxes = mp4_top_level_boxes(out.path)
    assert boxes.index("moov") < boxes.index("mdat")


def test_mp4_writer_left_without_finishing_kills_ffmpeg_and_removes_the_file(tmp_path):
    path = tmp_path / "cancelled.mp4"
    with pytest.raises(KeyError), Mp4Writer(path, fps=8) as mp4:
        mp4.write(np.zeros((4, 32, 32, 3), np.uint8))
        pid = mp4.pid
        raise KeyError("cancelled")
    assert process_gone(pid)
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_dying_mid_stream_raises_encode_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "died.mp4"
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    with pytest.raises(EncodeError, match="ffmpeg"), Mp4Writer(path, fps=8) as mp4:
        mp4.write(frames)
        os.kill(mp4.pid, signal.SIGKILL)
        for _ in range(100):  # the writes after its death fail, or finish() does
            mp4.write(frames)
            time.sleep(0.01)
        mp4.finish()
    assert process_gone(mp4.pid)
    assert not path.exists()


def test_ffmpeg_refusing_its_settings_raises_encode_error_with_its_message(tmp_path):
    with Mp4Writer(tmp_path / "x.mp4", fps=8, preset="no-such-preset") as mp4:
        mp4.write(np.zeros((2, 32, 32, 3), np.uint8))
        with pytest.raises(EncodeError, match="exited with .*preset"):
            mp4.finish()
    assert process_gone(mp4.pid) and list(tmp_path.iterdir()) == []


def test_mp4_writer_refuses_frames_of_another_size(tmp_path):
    with Mp4Writer(tmp_path / "x.mp4", fps=8) as mp4:
        mp4.write(np.zeros((1, 32, 32, 3), np.uint8))
        with pytest.raises(ValueError, match="48x32 after frames of 32x32"):
            mp4.write(np.zeros((4, 32, 48, 3), np.uint8))
        with pytest.raises(ValueError, match="no frames"):
            Mp4Writer(tmp_path / "y.mp4", fps=8).finish()
