"""GenerateRequest validation: defaults, limits and messages that name the bad value."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from contract.request import GenerateRequest, Limits, ValidatedRequest, frames_for_seconds
from contract.status import JobStatus, openai_status
from service.settings import ServiceSettings

LIMITS = Limits(max_num_frames=81, max_pixels=832 * 480, max_steps=50, max_prompt_chars=100)


def validate(**body):
    return GenerateRequest.model_validate(body, context={"limits": LIMITS})


def message(**body) -> str:
    with pytest.raises(ValidationError) as e:
        validate(**body)
    return str(e.value)


def test_defaults_fill_every_field():
    req = validate(prompt="a cat").validated(seed=11, model="tiny-wan2.1-t2v")
    dumped = req.model_dump(mode="json")
    assert None not in dumped.values()
    assert dumped["num_frames"] == LIMITS.default_num_frames
    # The request carries only the attention fields its caller set: the worker merges the rest.
    assert dumped["attention"] == {}
    assert dumped["seed"] == 11
    assert dumped["flow_shift"] == 3.0  # below 720p
    # The validated request is frozen.
    with pytest.raises(ValidationError):
        req.num_frames = 5  # type: ignore[misc]


def test_flow_shift_defaults_per_resolution_and_is_checked():
    wide = Limits(max_pixels=1280 * 720)
    at_720p = GenerateRequest.model_validate(
        {"prompt": "p", "width": 1280, "height": 720}, context={"limits": wide}
    )
    assert at_720p.flow_shift == 5.0
    assert validate(prompt="p", width=832, height=480).flow_shift == 3.0
    assert validate(prompt="p", flow_shift="7.5").flow_shift == 7.5
    assert "flow_shift must be in (0, 20]" in message(prompt="p", flow_shift=0)
    assert "flow_shift must be in (0, 20]" in message(prompt="p", flow_shift=21)


def test_attention_carries_only_what_was_set():
    req = validate(prompt="p", attention={"select": "topk", "topk": "2,10,9"})
    assert req.validated(seed=0, model="tiny-wan2.1-t2v").attention == {
        "select": "topk",
        "topk": [2, 10, 9],
    }


def test_valid_random_requests_round_trip():
    rng = random.Random()
    for _ in range(50):
        body = {
            "prompt": "x" * rng.randint(1, 100),
            "seed": rng.randint(0, 2**63 - 1),
            "num_frames": 4 * rng.randint(2, 20) + 1,
            "width": 16 * rng.randint(2, 30),
            "height": 16 * rng.randint(2, 30),
            "num_inference_steps": rng.randint(1, 50),
            "guidance_scale": rng.uniform(0, 20),
            "attention": {
                "backend": rng.choice(["vmoba", "dense"]),
                "select": rng.choice(["topk", "threshold_query", "threshold_global"]),
                "threshold": rng.random(),
                "topk": rng.randint(1, 30),
                "dense_steps": rng.random(),
            },
        }
        if body["width"] * body["height"] > LIMITS.max_pixels:
            continue
        req = validate(**body)
        assert req.num_frames == body["num_frames"] and req.seed == body["seed"]


def test_form_strings_are_numbers():
    req = validate(
        prompt="p",
        num_frames="33",
        width="64",
        guidance_scale="4.5",
        attention={"topk": "2,6,18", "threshold": "0.5"},
    )
    assert (req.num_frames, req.width, req.guidance_scale) == (33, 64, 4.5)
    assert req.attention.topk == (2, 6, 18) and req.attention.threshold == 0.5
    chunks = validate(
        prompt="p",
        attention={"spatial_chunk": "5,13", "st_chunk": [7, 5, 13], "temporal_chunk": "3"},
    ).attention
    assert (chunks.temporal_chunk, chunks.spatial_chunk, chunks.st_chunk) == (
        3,
        (5, 13),
        (7, 5, 13),
    )


@pytest.mark.parametrize(
    "body, words",
    [
        ({"prompt": ""}, ["prompt must not be empty"]),
        ({"prompt": "   "}, ["prompt must not be empty"]),
        ({"prompt": "x" * 101}, ["101 characters", "at most 100"]),
        ({"prompt": 5}, ["prompt", "string"]),
        ({"prompt": "p", "num_frames": 20}, ["4k+1", "got 20"]),
        ({"prompt": "p", "num_frames": 85}, ["[5, 81]", "got 85"]),
        ({"prompt": "p", "num_frames": True}, ["integer", "True"]),
        ({"prompt": "p", "num_frames": 17.5}, ["whole number"]),
        ({"prompt": "p", "num_frames": "seventeen"}, ["integer", "seventeen"]),
        ({"prompt": "p", "width": 100}, ["multiple of 16", "got 100"]),
        ({"prompt": "p", "width": 16}, ["width", "got 16"]),
        ({"prompt": "p", "width": 1280, "height": 720}, ["1280x720", "pixels", str(832 * 480)]),
        ({"prompt": "p", "num_inference_steps": 0}, ["[1, 50]", "got 0"]),
        ({"prompt": "p", "guidance_scale": float("nan")}, ["finite"]),
        ({"prompt": "p", "guidance_scale": 50}, ["guidance_scale", "got 50"]),
        ({"prompt": "p", "fps": 0}, ["fps", "got 0"]),
        ({"prompt": "p", "seed": -1}, ["seed", "got -1"]),
        ({"prompt": "p", "colour": "red"}, ["colour", "Extra inputs"]),
        ({"prompt": "p", "attention": {"backend": "flash"}}, ["backend", "vmoba", "dense"]),
        ({"prompt": "p", "attention": {"select": "best"}}, ["select", "threshold_global"]),
        ({"prompt": "p", "attention": {"threshold": 1.5}}, ["threshold", "1"]),
        ({"prompt": "p", "attention": {"topk": [1, 2]}}, ["three", "2 values"]),
        ({"prompt": "p", "attention": {"topk": 0}}, ["topk", "got 0"]),
        ({"prompt": "p", "attention": {"treshold": 0.3}}, ["treshold", "Extra inputs"]),
        ({"prompt": "p", "attention": {"spatial_chunk": [5]}}, ["2 integers", "[5]"]),
        ({"prompt": "p", "attention": {"st_chunk": [0, 5, 5]}}, ["st_chunk", "[1, 1024]"]),
    ],
)
def test_bad_values_name_value_and_range(body, words):
    text = message(**body)
    for word in words:
        assert word in text, (word, text)


def test_limits_come_from_settings():
    s = ServiceSettings(MAX_NUM_FRAMES=33, MODEL="tiny")
    [tiny] = s.models()
    lim = s.limits_for(tiny)
    assert lim.max_num_frames == 33 and lim.default_num_frames == 17
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "p", "num_frames": 37}, context={"limits": lim})
    [wan] = ServiceSettings(MODEL="Wan-AI/Wan2.1-T2V-1.3B-Diffusers").models()
    assert wan.id == "wan2.1-t2v-1.3b"
    wan_lim = ServiceSettings().limits_for(wan)
    assert (wan_lim.default_num_frames, wan_lim.default_width, wan_lim.default_height) == (
        81,
        832,
        480,
    )
    assert wan_lim.default_negative_prompt  # Wan's own negative prompt
    # The model's own maximum stays under the service's: a tiny CPU model takes no 129 frames.
    assert ServiceSettings(MAX_NUM_FRAMES=129).limits_for(tiny).max_num_frames == 81


def test_seconds_and_status_mapping():
    assert frames_for_seconds(4, 16) == 65 and frames_for_seconds(5, 16) == 81
    assert frames_for_seconds(1, 16) == 17
    assert (
        validate(prompt="p", num_frames=65, fps=16)
        .validated(seed=0, model="tiny-wan2.1-t2v")
        .seconds
        == "4"
    )
    assert openai_status(JobStatus.cancelled) == "failed"
    assert openai_status("in_progress") == "in_progress"


def test_payload_round_trip():
    from contract.keys import new_job_id

    job_id = new_job_id()
    req = validate(prompt="a dog", seed=7, attention={"backend": "dense"}).validated(
        seed=1, model="tiny-wan2.1-t2v"
    )
    payload = req.to_payload(job_id)
    assert payload["job_id"] == job_id and payload["seed"] == 7
    assert payload["attention"] == {"backend": "dense"}  # only what the caller set
    got_id, got = ValidatedRequest.from_payload(payload)
    assert got_id == job_id and got == req
    with pytest.raises(ValueError):
        ValidatedRequest.from_payload({"prompt": "no id"})


def _option(prop: dict) -> dict:
    """A property's non-null option."""
    return next((o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"), prop)


def test_openapi_states_this_deployments_limits():
    from service.app import create_app

    settings = ServiceSettings(MODEL="tiny", MAX_NUM_FRAMES=33, MAX_STEPS=12, MAX_SIDE_PX=512)
    spec = create_app(settings).openapi()
    for path in ("/generate", "/v1/videos"):
        for media, body in spec["paths"][path]["post"]["requestBody"]["content"].items():
            schema = body["schema"]
            props = schema["properties"]
            assert _option(props["num_frames"])["enum"] == [5, 9, 13, 17, 21, 25, 29, 33]
            assert _option(props["width"]) | {"title": None} == {
                "type": "integer",
                "minimum": 32,
                "maximum": 512,
                "multipleOf": 16,
                "title": None,
            }
            assert _option(props["num_inference_steps"])["maximum"] == 12
            assert _option(props["model"])["enum"] == ["tiny-wan2.1-t2v"]
            assert props["prompt"]["minLength"] == 1 and props["prompt"]["maxLength"] == 2000
            assert schema["additionalProperties"] is False
            assert "262144 pixels" in schema["description"]  # the tiny model's pixel budget
            if media != "application/json":  # a form cannot send null
                assert all("anyOf" not in p or len(p["anyOf"]) > 1 for p in props.values())
                assert "null" not in str([p.get("type") for p in props.values()])
    events = spec["paths"]["/jobs/{job_id}/events"]["get"]["parameters"]
    last_id = next(p for p in events if p["in"] == "header")
    assert last_id["schema"]["type"] == "string" and last_id["schema"]["pattern"]
