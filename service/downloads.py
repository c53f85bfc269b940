"""A finished job's files over HTTP, from whichever results storage the API has (`state.storage`).

- The local folder (`STORAGE_URL` unset): starlette's `FileResponse` (Range, 206, 416).
- Object storage: the object is streamed through the API in chunks, each read in a worker thread
  (boto3 blocks), with the same headers and Range semantics as a local file: one range gives
  `206` + `Content-Range`, an unsatisfiable one `416` + `Content-Range: bytes */size`, no Range (or
  several disjoint ranges, which object storage cannot read in one request) the whole file. With
  `STORAGE_REDIRECT=1` the answer is instead a `307` to a presigned URL valid for
  `STORAGE_REDIRECT_EXPIRY_S`, and the client fetches the bytes from storage itself.

Storage being unreachable becomes `503` + `Retry-After` (`service.errors`), never a 500, as long
as no byte has been sent; a failure mid-stream aborts the connection (the client sees a short
download, never a truncated file passed off as complete).
"""

from __future__ import annotations

import logging
from email.utils import formatdate
from functools import partial
from typing import Optional
from urllib.parse import quote

import anyio
from fastapi import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from contract.storage import Body

from .errors import APIError
from .state import AppState

log = logging.getLogger("service")

# Bytes read from storage per thread hop while streaming.
CHUNK_BYTES = 256 * 1024
# Range headers with more parts than this are ignored (the whole file is sent), as starlette does.
MAX_RANGES = 100


async def serve_file(
    state: AppState,
    request: Request,
    job_id: str,
    name: str,
    media_type: str,
    download_name: Optional[str] = None,
) -> Response:
    """The file `name` of job `job_id` (its record is known to be completed)."""
    storage = state.storage
    path = storage.local_path(job_id, name)
    if path is not None:
        if not await anyio.Path(path).is_file():
            raise _missing(job_id, name)
        return FileResponse(
            path, media_type=media_type, filename=download_name, content_disposition_type="inline"
        )

    info = await anyio.to_thread.run_sync(storage.stat, job_id, name)
    if info is None:
        raise _missing(job_id, name)
    disposition = content_disposition("inline", download_name)
    if state.settings.STORAGE_REDIRECT:
        # Signing makes no request, but the first call builds a boto3 client: not on the loop.
        url = await anyio.to_thread.run_sync(
            partial(
                storage.presigned_url,
                job_id,
                name,
                expires_s=state.settings.STORAGE_REDIRECT_EXPIRY_S,
                content_type=media_type,
                content_disposition=disposition,
            )
        )
        if url is not None:
            # The URL expires: nobody may cache the redirect longer than that.
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})

    headers = {
        "accept-ranges": "bytes",
        "etag": info.etag,
        "last-modified": formatdate(info.last_modified, usegmt=True),
    }
    if disposition:
        headers["content-disposition"] = disposition
    status, start, end = 200, 0, info.size
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header is not None and (
        if_range is None or if_range in (headers["etag"], headers["last-modified"])
    ):
        ranges = parse_range(range_header, info.size)
        if len(ranges) == 1:
            status, (start, end) = 206, ranges[0]
            headers["content-range"] = f"bytes {start}-{end - 1}/{info.size}"
    headers["content-length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    whole = (start, end) == (0, info.size)
    try:
        body = await anyio.to_thread.run_sync(
            storage.open, job_id, name, start, None if whole else end
        )
    except FileNotFoundError:
        raise _missing(job_id, name) from None
    return StreamingResponse(
        _chunks(body, f"{job_id}/{name}"),
        status_code=status,
        headers=headers,
        media_type=media_type,
    )


async def _chunks(body: Body, what: str):
    """The body's bytes, read in a thread a chunk at a time; closed however the stream ends."""
    try:
        while True:
            data = await anyio.to_thread.run_sync(body.read, CHUNK_BYTES)
            if not data:
                return
            yield data
    except Exception as exc:  # headers are out: all that is left is to abort the connection
        log.warning("streaming %s from storage failed: %s", what, exc)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(body.close)


def parse_range(header: str, size: int) -> list[tuple[int, int]]:
    """`[(start, end), ...]` (end exclusive, overlapping parts merged) of a `Range` header for a
    file of `size` bytes; an empty list means "send the whole file". Raises `APIError` 400 for a
    malformed header and 416 for one whose start lies past the end (starlette's rules, so both
    storages answer alike)."""
    units, sep, spec = header.partition("=")
    if not sep or units.strip().lower() != "bytes":
        raise APIError(400, f"Range must be 'bytes=start-end', got {header[:100]!r}", param="Range")
    if spec.count(",") + 1 > MAX_RANGES:
        return []
    ranges = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not (first or last):
            continue
        try:
            if first:
                start = int(first)
                end = int(last) + 1 if last and int(last) < size else size
            else:
                start, end = max(size - int(last), 0), size
        except ValueError:
            continue
        ranges.append((start, end))
    if not ranges:
        raise APIError(400, f"Range names no byte range: {header[:100]!r}", param="Range")
    if any(not 0 <= start < size for start, _ in ranges):
        raise APIError(
            416,
            f"Range {header[:100]!r} starts past the end of the file ({size} bytes)",
            param="Range",
            code="range_not_satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if any(start >= end for start, end in ranges):
        raise APIError(400, f"Range {header[:100]!r}: start must be before end", param="Range")
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def content_disposition(kind: str, filename: Optional[str]) -> Optional[str]:
    """`inline; filename="x.mp4"` as starlette writes it (RFC 5987 form for non-ASCII names)."""
    if filename is None:
        return None
    quoted = quote(filename)
    if quoted != filename:
        return f"{kind}; filename*=utf-8''{quoted}"
    return f'{kind}; filename="{filename}"'


def _missing(job_id: str, name: str) -> APIError:
    return APIError(
        404,
        f"{name} of job {job_id} is missing (expired or removed)",
        param="id",
        code="file_missing",
    )
