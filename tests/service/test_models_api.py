"""Models over HTTP: routing by `model`, per-model defaults, image-to-video input checks (the API's
side; the worker's is in tests/worker/test_model_families.py)."""

from __future__ import annotations

import base64
import io
import random

import httpx
import numpy as np
import pytest
from PIL import Image
from rq import Queue

from contract.enqueue import queue_name


def png(width: int, height: int, *, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


@pytest.fixture
def i2v_server(make_server):
    """Serves the tiny T2V twin (the default) and the tiny Wan 2.1 I2V twin; 2 MiB images."""
    return make_server(
        MODEL="tiny,tiny-wan2.1-i2v", MAX_IMAGE_BYTES=2 * 1024 * 1024, MAX_IMAGE_PIXELS=1024 * 1024
    )


def test_image_to_video_is_stored_fitted_and_routed(i2v_server, redis_client, store):
    seed = random.randrange(2**31)
    image = png(300, 100, seed=seed)  # wider than the video: scaled to cover, centre-cropped
    with httpx.Client(base_url=i2v_server.url) as http:
        r = http.post(
            "/generate",
            data={"model": "tiny-wan2.1-i2v", "prompt": "p", "width": "64", "height": "64"},
            files={"image": ("in.png", image, "image/png")},
        )
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["model"] == "tiny-wan2.1-i2v" and job["request"]["task"] == "i2v"
        assert "no live worker" in job["warning"]  # queued all the same
        stored = Image.open(io.BytesIO(store.get_input_image(job["id"])))
        assert stored.size == (64, 64) and stored.format == "PNG"
        # Scale 64/100 covers the height; the centre 64 columns of the 192-wide scaled image.
        expected = (
            Image.open(io.BytesIO(image))
            .convert("RGB")
            .resize((192, 64), Image.Resampling.LANCZOS)
            .crop((64, 0, 128, 64))
        )
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(expected)), seed
        assert Queue(queue_name("vmoba", "tiny-wan2.1-i2v"), connection=redis_client).job_ids == [
            job["id"]
        ]
        # The same through JSON with a data URL, and through the OpenAI route.
        url = (
            "data:image/jpeg;base64,"
            + base64.b64encode(png(80, 80, seed=seed, fmt="JPEG")).decode()
        )
        r = http.post("/generate", json={"model": "tiny-wan2.1-i2v", "prompt": "p", "image": url})
        assert r.status_code == 202, r.text
        r = http.post(
            "/v1/videos",
            data={"model": "tiny-wan2.1-i2v", "prompt": "p"},
            files={"input_reference": ("r.webp", png(70, 90, seed=seed, fmt="WEBP"), "image/webp")},
        )
        assert r.status_code == 200, r.text
        # Deleting the job deletes its image.
        assert http.delete(f"/jobs/{job['id']}").status_code in (200, 204)
        assert store.get_input_image(job["id"]) is None


@pytest.mark.parametrize(
    "files, status, words",
    [
        (
            {"image": ("x.png", b"\x89PNG\r\n\x1a\n not really", "image/png")},
            400,
            ["not a readable"],
        ),
        ({"image": ("x.gif", None, "image/gif")}, 400, ["GIF", "PNG, JPEG or WebP"]),
        ({"image": ("big.png", None, "image/png")}, 413, ["pixels", "at most"]),
        ({"image": ("", b"", "image/png")}, 400, ["empty"]),
    ],
)
def test_bad_images_are_refused_by_name(i2v_server, files, status, words):
    seed = random.randrange(2**31)
    name, data, ctype = files["image"]
    if name == "x.gif":
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, "GIF")
        data = out.getvalue()
    elif name == "big.png":
        out = io.BytesIO()
        Image.new("RGB", (1200, 1000), (200, 40, 40)).save(out, "PNG")  # 1.2 Mpx, a few kB
        data = out.getvalue()
    r = httpx.post(
        f"{i2v_server.url}/generate",
        data={"model": "tiny-wan2.1-i2v", "prompt": "p"},
        files={"image": (name or "e.png", data, ctype)},
    )
    assert r.status_code == status, (seed, r.text)
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message, (word, message)


def test_oversize_file_is_413_and_task_mismatches_are_400(i2v_server):
    with httpx.Client(base_url=i2v_server.url) as http:
        big = b"\x89PNG" + b"0" * (2 * 1024 * 1024 + 10)
        r = http.post(
            "/generate",
            data={"model": "tiny-wan2.1-i2v", "prompt": "p"},
            files={"image": ("big.png", big, "image/png")},
        )
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
        r = http.post(
            "/generate",
            data={"prompt": "p"},
            files={"image": ("a.png", png(32, 32, seed=1), "image/png")},
        )
        assert r.status_code == 400 and "text-to-video only" in r.json()["error"]["message"]
        r = http.post("/generate", json={"model": "tiny-wan2.1-i2v", "prompt": "p"})
        assert r.status_code == 400 and "from an image" in r.json()["error"]["message"]
        r = http.post("/generate", json={"model": "sora-2", "prompt": "p"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "model_not_found"
        assert "tiny-wan2.1-i2v" in err["message"]


def test_models_lists_the_served_models_with_their_defaults(i2v_server, store):
    store.heartbeat(
        "w1",
        {
            "queue": "vmoba",
            "models": ["tiny-wan2.1-i2v"],
            "model_specs": [
                {
                    "id": "tiny-wan2.1-i2v",
                    "tasks": ["i2v"],
                    "attention_defaults": {"select": "topk"},
                }
            ],
        },
        ttl_s=5,
    )
    with httpx.Client(base_url=i2v_server.url) as http:
        models = {m["id"]: m for m in http.get("/models").json()["data"]}
        openai_ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert list(models) == openai_ids == ["tiny-wan2.1-t2v", "tiny-wan2.1-i2v"]
    t2v, i2v = models["tiny-wan2.1-t2v"], models["tiny-wan2.1-i2v"]
    assert t2v["default"] and not t2v["available"] and t2v["tasks"] == ["t2v"]
    assert i2v["available"] and i2v["tasks"] == ["i2v"] and i2v["workers"][0]["name"] == "w1"
    assert i2v["attention_defaults"] == {"select": "topk"}
    assert i2v["limits"]["max_num_frames"] == 81 and i2v["limits"]["default_num_frames"] == 17
