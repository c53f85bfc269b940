"""The OpenAPI document with this deployment's limits in it.

FastAPI derives the spec from the pydantic models, which know types but not the limits: those
come from settings and the served models (`Limits`), and the checks that enforce them give their
own messages. This fills them into the request bodies of `POST /generate` and `POST /v1/videos`
(ranges, `multipleOf`, the frame counts as an enum, the served models) and the attention knobs'
fixed ranges, and drops `null` from query and header parameters (they cannot carry one). What JSON
Schema cannot say stays in the descriptions: `width * height <= max_pixels`, and OpenAI's
`seconds` and `size` against the frame and size limits.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from contract.request import MAX_CHUNK, MAX_FLOW_SHIFT, MAX_SEED, Limits

CREATE_PATHS = ("/generate", "/v1/videos")


def _loosest(limits: list[Limits]) -> Limits:
    """One set of bounds covering every served model (a model's own stricter limits, and the
    pixel budget, are in the description)."""
    first = limits[0]
    return first.model_copy(
        update={
            name: max(getattr(x, name) for x in limits)
            for name in ("max_prompt_chars", "max_num_frames", "max_side_px", "max_pixels")
        }
        | {
            name: min(getattr(x, name) for x in limits)
            for name in ("min_num_frames", "min_side_px")
        }
    )


def _non_null(prop: dict) -> dict:
    """`anyOf: [X, null]` -> `X` (keeping the property's other keywords)."""
    options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
    if len(options) != 1:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**rest, **options[0]}


def _set(prop: dict, **keywords: Any) -> dict:
    """`prop` with `keywords` on its non-null type (in place of pydantic's `ge`/`le`)."""
    options = prop.get("anyOf")
    if options is None:
        return {**{k: v for k, v in prop.items() if k not in ("ge", "le")}, **keywords}
    return {
        **prop,
        "anyOf": [o if o.get("type") == "null" else _set(o, **keywords) for o in options],
    }


def _body_properties(props: dict, lim: Limits, model_ids: list[str]) -> dict:
    first_frames = lim.min_num_frames + (1 - lim.min_num_frames) % 4  # frames are 4k+1
    frames = list(range(first_frames, lim.max_num_frames + 1, 4))
    side = {
        "minimum": lim.min_side_px,
        "maximum": lim.max_side_px,
        "multipleOf": lim.size_multiple,
    }
    patches: dict[str, dict] = {
        "prompt": {"maxLength": lim.max_prompt_chars},
        "model": {"enum": model_ids},
        "num_frames": {"enum": frames},
        "width": side,
        "height": side,
        "num_inference_steps": {"minimum": 1, "maximum": lim.max_steps},
        "guidance_scale": {"minimum": 0, "maximum": lim.max_guidance_scale},
        "fps": {"minimum": 1, "maximum": lim.max_fps},
        "flow_shift": {"exclusiveMinimum": 0, "maximum": MAX_FLOW_SHIFT},
        "seed": {"minimum": 0, "maximum": MAX_SEED},
        "size": {"pattern": r"^[0-9]{1,5}x[0-9]{1,5}$"},
        "seconds": {"pattern": r"^[0-9]{1,4}(\.[0-9]{1,3})?$"},
    }
    out = dict(props)
    for name, keywords in patches.items():
        if name in out:
            out[name] = _set(out[name], **keywords)
    if "attention" in out:
        out["attention"] = _attention(out["attention"], lim)
    return out


def _attention(prop: dict, lim: Limits) -> dict:
    def patch(obj: dict) -> dict:
        if obj.get("type") != "object":
            return obj
        p = dict(obj["properties"])
        chunk = {"minimum": 1, "maximum": MAX_CHUNK}
        p["threshold"] = _set(p["threshold"], minimum=0, maximum=1)
        p["dense_steps"] = _set(p["dense_steps"], minimum=0, maximum=1)
        p["temporal_chunk"] = _set(p["temporal_chunk"], **chunk)
        p["spatial_chunk"] = _items(p["spatial_chunk"], chunk)
        p["st_chunk"] = _items(p["st_chunk"], chunk)
        p["topk"] = _items(p["topk"], {"minimum": 1, "maximum": lim.max_topk})
        return {**obj, "properties": p}

    if "anyOf" in prop:
        return {**prop, "anyOf": [patch(o) for o in prop["anyOf"]]}
    return patch(prop)


def _items(prop: dict, bounds: dict) -> dict:
    """Bounds on an integer, or on each integer of a fixed-length array, in `prop`'s options."""

    def patch(option: dict) -> dict:
        if option.get("type") == "integer":
            return {**option, **bounds}
        if option.get("type") == "array":
            return {
                **option,
                "prefixItems": [{**item, **bounds} for item in option.get("prefixItems", [])],
            }
        return option

    if "anyOf" in prop:
        return {**prop, "anyOf": [patch(o) for o in prop["anyOf"]]}
    return patch(prop)


# OpenAI's fields and ours that say the same thing: a body gives one or the other.
EXCLUSIVE_FIELDS = (("size", "width"), ("size", "height"), ("seconds", "num_frames"))


def _not_both(props: dict, a: str, b: str) -> dict:
    """Not both `a` and `b` given with a value (null counts as not given)."""
    return {
        "not": {
            "required": [a, b],
            "properties": {name: _non_null(props[name]) for name in (a, b)},
        }
    }


def with_limits(spec: dict, limits: list[Limits], model_ids: list[str]) -> dict:
    """`spec` (FastAPI's) with the limits filled in; see the module docstring."""
    lim = _loosest(limits)
    for path, item in spec.get("paths", {}).items():
        for op in item.values():
            for param in op.get("parameters", []):
                if param.get("in") in ("query", "header"):
                    param["schema"] = _non_null(param["schema"])
            if path not in CREATE_PATHS:
                continue
            for media in op.get("requestBody", {}).get("content", {}).values():
                schema = media["schema"]
                schema["additionalProperties"] = False  # unknown fields are refused
                schema["properties"] = _body_properties(schema["properties"], lim, model_ids)
                exclusive = [
                    _not_both(schema["properties"], a, b)
                    for a, b in EXCLUSIVE_FIELDS
                    if a in schema["properties"]
                ]
                if exclusive:
                    schema["allOf"] = exclusive
                schema["description"] = (
                    f"{schema.get('description', '')}\n\nAlso: width * height <= "
                    f"{lim.max_pixels} pixels; frames (num_frames, or seconds x fps) within "
                    f"[{lim.min_num_frames}, {lim.max_num_frames}]; per-model limits: GET /models."
                ).strip()
    return spec


def install(app: FastAPI, limits: list[Limits], model_ids: list[str]) -> None:
    """Serve `with_limits` as the app's `/openapi.json` (built once, on first request)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = with_limits(spec, limits, model_ids)
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
