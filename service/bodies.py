"""Reading request bodies into plain dicts: JSON, multipart/form-data and urlencoded forms.

Bodies are read with a size cap (`MAX_BODY_BYTES`, 413 beyond). Forms follow the OpenAI client's
conventions: every value is a string; nested objects arrive as bracketed keys
(`attention[backend]=dense`) or as a JSON string (`attention={"backend": "dense"}`). One file may
be uploaded, as `image` or `input_reference` (image-to-video; checked in `service.images`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
import orjson
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from .errors import APIError
from .images import Upload

MAX_FORM_FIELDS = 64
IMAGE_FIELDS = ("image", "input_reference")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, or 413 once it passes `limit` bytes, or 408 when it has not all arrived
    after `timeout_s` (a client sending slowly or stopping half-way holds no connection long)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError(
                400, f"Content-Length must be an integer, got {declared[:40]!r}"
            ) from None
        if too_big:
            raise APIError(413, f"request body has {declared} bytes; at most {limit} allowed")
    chunks, size = [], 0
    with anyio.move_on_after(timeout_s) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds {limit} bytes")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)",
            headers={"Connection": "close"},
        )
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict:
    if not body.strip():
        raise APIError(
            400,
            "request body is empty; send a JSON object like "
            '{"prompt": "a red fox running through snow"}',
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got a {type(data).__name__}")
    return data


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


def _nest(items: list[tuple[str, object]]) -> dict:
    """Form items to a dict; `a[b]=v` becomes `{"a": {"b": v}}`; a key given twice is an error."""
    out: dict = {}
    for key, value in items:
        if isinstance(value, UploadFile):
            if key not in IMAGE_FIELDS:
                raise APIError(
                    400,
                    f"file uploads are accepted only as {' or '.join(IMAGE_FIELDS)} "
                    f"(image-to-video), not as {key!r}",
                    param=key,
                )
            if key in out:
                raise APIError(400, f"form field {key!r} is given more than once", param=key)
            value.file.seek(0)
            out[key] = Upload(key, value.file.read(), value.filename or "")
            continue
        if "[" in key and key.endswith("]"):
            outer, inner = key[:-1].split("[", 1)
            if "[" in inner or "]" in inner or not outer or not inner:
                raise APIError(
                    400, f"form field name {key!r} is not of the form name[key]", param=key
                )
            target = out.setdefault(outer, {})
            if not isinstance(target, dict):
                raise APIError(
                    400,
                    f"form field {outer!r} given both as a value and as {outer}[...]",
                    param=outer,
                )
            if inner in target:
                raise APIError(400, f"form field {key!r} is given more than once", param=key)
            target[inner] = value
            continue
        if key in out:
            raise APIError(400, f"form field {key!r} is given more than once", param=key)
        if isinstance(value, str) and value.lstrip().startswith("{") and key == "attention":
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as e:
                raise APIError(400, f"attention must be a JSON object: {e}", param=key) from None
        out[key] = value
    return out


async def parse_form_or_json(request: Request, body: bytes) -> dict:
    """A dict from a JSON, multipart/form-data or urlencoded body (by Content-Type)."""
    ctype = request.headers.get("content-type", "").lower()
    parser: MultiPartParser | FormParser
    if ctype.startswith("multipart/form-data"):
        parser = MultiPartParser(
            request.headers,
            _once(body),
            max_files=1,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=len(body) + 1,
        )
    elif ctype.startswith("application/x-www-form-urlencoded"):
        parser = FormParser(request.headers, _once(body))
    elif ctype.startswith("application/json") or not ctype:
        return parse_json_object(body)
    else:
        raise APIError(
            415,
            f"Content-Type {ctype[:80]!r} is not accepted; send "
            "multipart/form-data, application/x-www-form-urlencoded or "
            "application/json",
        )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed form body: {e.message}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed form body: {e}") from None
    try:
        return _nest(list(form.multi_items()))
    finally:
        await form.close()
