"""Every bad input is a 4xx in the error envelope with a useful message, never a 5xx."""

from __future__ import annotations

import json
import os
import random
import string

import httpx
import pytest


@pytest.fixture(scope="module")
def http(shared_server):
    with httpx.Client(base_url=shared_server.url, timeout=10) as client:
        yield client


@pytest.fixture
def server(shared_server):
    return shared_server


def check_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], (word, err["message"])
    return err


@pytest.mark.parametrize(
    "body, words",
    [
        ({"prompt": ""}, ["prompt must not be empty"]),
        ({}, ["prompt", "field required"]),
        ({"prompt": None}, ["prompt"]),
        ({"prompt": ["a"]}, ["prompt", "string"]),
        ({"prompt": "x" * 2001}, ["2001 characters", "at most 2000"]),
        ({"prompt": "p", "negative_prompt": "x" * 2001}, ["negative_prompt", "at most 2000"]),
        ({"prompt": "p", "num_frames": 16}, ["4k+1", "got 16"]),
        ({"prompt": "p", "num_frames": 133}, ["[5, 81]", "got 133"]),
        ({"prompt": "p", "num_frames": 1}, ["[5, 81]", "got 1"]),
        ({"prompt": "p", "num_frames": "many"}, ["num_frames", "integer", "many"]),
        ({"prompt": "p", "num_frames": False}, ["num_frames", "boolean"]),
        ({"prompt": "p", "num_frames": 1e300}, ["num_frames"]),
        ({"prompt": "p", "num_frames": 10**40}, ["num_frames"]),
        ({"prompt": "p", "width": 65}, ["width", "multiple of 16", "got 65"]),
        ({"prompt": "p", "height": 4096}, ["height", "[32, 1920]", "got 4096"]),
        ({"prompt": "p", "width": 1920, "height": 1088}, ["1920x1088", "pixels", "262144"]),
        ({"prompt": "p", "width": -16}, ["width", "got -16"]),
        ({"prompt": "p", "num_inference_steps": 1000}, ["num_inference_steps", "[1, 100]"]),
        ({"prompt": "p", "guidance_scale": "high"}, ["guidance_scale", "number", "high"]),
        ({"prompt": "p", "guidance_scale": -1}, ["guidance_scale", "got -1"]),
        ({"prompt": "p", "fps": 120}, ["fps", "[1, 60]", "got 120"]),
        ({"prompt": "p", "seed": 2**64}, ["seed", "2**63-1"]),
        ({"prompt": "p", "seed": "lucky"}, ["seed", "integer", "lucky"]),
        ({"prompt": "p", "attention": "sparse"}, ["attention"]),
        ({"prompt": "p", "attention": {"backend": "flash"}}, ["attention.backend", "'flash'"]),
        ({"prompt": "p", "attention": {"threshold": 2}}, ["attention.threshold", "1"]),
        ({"prompt": "p", "attention": {"dense_steps": -0.5}}, ["attention.dense_steps", "0"]),
        ({"prompt": "p", "attention": {"topk": [1, 2, 3, 4]}}, ["topk", "three", "4 values"]),
        ({"prompt": "p", "attention": {"topk": 5000}}, ["topk", "[1, 1024]"]),
        ({"prompt": "p", "attention": {"x": 1}}, ["attention.x", "unknown field"]),
        ({"prompt": "p", "steps": 3}, ["steps", "unknown field"]),
    ],
)
def test_bad_generate_bodies(http, body, words):
    err = check_error(http.post("/generate", json=body), 400, *words)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"


@pytest.mark.parametrize(
    "content, headers, status, words",
    [
        (b"", {}, 400, ["empty"]),
        (b"{not json", {}, 400, ["not valid JSON"]),
        (b"[1, 2]", {}, 400, ["JSON object", "list"]),
        (b'"prompt"', {}, 400, ["JSON object", "str"]),
        (b'{"prompt": "\xff\xfe"}', {}, 400, ["not valid JSON"]),
        (b"x" * 300_000, {}, 413, ["bytes"]),
    ],
)
def test_malformed_bodies(server, content, headers, status, words):
    with httpx.Client(base_url=server.url) as c:
        req = c.build_request(
            "POST",
            "/generate",
            content=content,
            headers={"content-type": "application/json", **headers},
        )
        check_error(c.send(req), status, *words)


def test_bad_multipart_and_content_types(http):
    check_error(
        http.post(
            "/v1/videos",
            content=b"--xx\r\nnot a part\r\n",
            headers={"content-type": "multipart/form-data; boundary=xx"},
        ),
        400,
        "form",
    )
    check_error(
        http.post("/v1/videos", content=b"data", headers={"content-type": "multipart/form-data"}),
        400,
        "boundary",
    )
    check_error(
        http.post("/v1/videos", content=b"<xml/>", headers={"content-type": "application/xml"}),
        415,
        "application/xml",
    )
    check_error(
        http.post("/v1/videos", data={"prompt": "p", "attention": "{bad"}), 400, "attention", "JSON"
    )
    check_error(
        http.post("/v1/videos", files=[("prompt", (None, "a")), ("prompt", (None, "b"))]),
        400,
        "more than once",
    )
    check_error(
        http.post("/v1/videos", data={"prompt": "p", "seconds": "four"}), 400, "seconds", "positive"
    )
    check_error(
        http.post("/v1/videos", data={"prompt": "p", "seconds": "1", "num_frames": "17"}),
        400,
        "not both",
    )
    check_error(
        http.post("/v1/videos", data={"prompt": "p", "size": "64x64", "width": "64"}),
        400,
        "not both",
    )
    check_error(http.post("/v1/videos", data={"prompt": "p", "a[b][c]": "1"}), 400, "a[b][c]")


def test_bad_ids_and_queries(http):
    for path in (
        "/jobs/nope",
        "/jobs/video_" + "0" * 32,
        "/jobs/..%2F..%2Fetc%2Fpasswd",
        "/jobs/video_ABC/video",
        "/v1/videos/x/content",
        "/jobs/%00/thumbnail",
    ):
        check_error(http.get(path), 404)
    check_error(http.get("/jobs", params={"limit": 0}), 400, "limit", "[1, 100]")
    check_error(http.get("/jobs", params={"limit": "ten"}), 400, "limit")
    check_error(http.get("/jobs", params={"order": "sideways"}), 400, "asc", "desc")
    check_error(http.get("/jobs", params={"after": "../x"}), 400, "after")
    check_error(http.get("/v1/videos", params={"after": "video_" + "1" * 32}), 404, "not a job")
    job_id = http.post("/generate", json={"prompt": "p"}).json()["id"]
    check_error(
        http.get(f"/v1/videos/{job_id}/content", params={"variant": "spritesheet"}),
        400,
        "variant",
        "thumbnail",
    )
    check_error(
        http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"}), 400, "Last-Event-ID"
    )
    check_error(http.get("/nowhere"), 404, "no route")
    check_error(http.put("/generate"), 405, "PUT")
    check_error(
        http.post("/generate", json={"prompt": "p"}, headers={"Idempotency-Key": "k" * 300}),
        400,
        "Idempotency-Key",
    )


def _junk(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randint(-(10**20), 10**20)
    if kind == 1:
        return rng.random() * 10 ** rng.randint(-5, 30) * rng.choice([-1, 1])
    if kind == 2:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30)))
    if kind == 3:
        return [rng.randint(0, 9) for _ in range(rng.randint(0, 4))]
    if kind == 4:
        return {"backend": rng.choice(["vmoba", "x"]), "topk": rng.randint(-3, 9)}
    return rng.choice([None, True, False])


FIELDS = [
    "prompt",
    "negative_prompt",
    "seed",
    "num_frames",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "fps",
    "attention",
    "seconds",
    "size",
    "model",
]


def test_fuzzed_bodies_never_5xx(http):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    statuses = []
    for i in range(150):
        body = {name: _junk(rng) for name in rng.sample(FIELDS, rng.randint(0, 6))}
        if rng.random() < 0.5:
            body["prompt"] = "fuzz"
        if i % 3 == 0:
            r = http.post(
                "/generate", content=json.dumps(body), headers={"content-type": "application/json"}
            )
        elif i % 3 == 1:
            r = http.post("/v1/videos", json=body)
        else:
            form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
            r = http.post("/v1/videos", data=form)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"], body
        statuses.append(r.status_code)
    assert 400 in statuses
