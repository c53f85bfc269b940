"""Input images for image-to-video: decoded, checked and fitted to the job's size in the API, so
the worker receives a PNG of exactly `width x height`.

Accepted: PNG, JPEG and WebP, at most `MAX_IMAGE_BYTES` and `MAX_IMAGE_PIXELS`. Fitting: scale
the image (Lanczos) by the smallest factor that covers `width x height`, then crop the centre;
this keeps the aspect ratio and fills the frame, as Wan's image-to-video pipelines expect their
first frame. Anything else is a 400 (or 413 for size) naming the problem; nothing here can 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import APIError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
DATA_URL_RE = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,(?P<data>.*)", re.DOTALL
)


@dataclass(frozen=True)
class Upload:
    """An uploaded file as read from a form (`field` is its form name)."""

    field: str
    data: bytes
    filename: str = ""


def from_data_url(text: str, field: str) -> Upload:
    """The bytes of a `data:image/...;base64,...` URL (or bare base64)."""
    m = DATA_URL_RE.fullmatch(text.strip())
    payload = m.group("data") if m else text.strip()
    try:
        return Upload(field, base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise APIError(
            400,
            f"{field} must be an image file or a base64 data URL (data:image/png;base64,...)",
            param=field,
        ) from None


def fit_image(upload: Upload, width: int, height: int, *, max_bytes: int, max_pixels: int) -> bytes:
    """A PNG of `upload` resized and centre-cropped to `width x height` (see the module
    docstring). 413 when too large, 400 when not a decodable PNG/JPEG/WebP."""
    field = upload.field
    if len(upload.data) > max_bytes:
        raise APIError(
            413, f"{field} has {len(upload.data)} bytes; at most {max_bytes} allowed", param=field
        )
    if not upload.data:
        raise APIError(400, f"{field} is empty", param=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(upload.data))
            kind = opened.format
            if kind not in FORMATS:
                raise APIError(
                    400,
                    f"{field} is a {kind or 'unknown'} image; send PNG, JPEG or WebP",
                    param=field,
                )
            if opened.width * opened.height > max_pixels:
                raise APIError(
                    413,
                    f"{field} is {opened.width}x{opened.height} "
                    f"({opened.width * opened.height} pixels); at most "
                    f"{max_pixels} allowed",
                    param=field,
                )
            opened.load()
    except APIError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Warning,
        Image.DecompressionBombError,
    ) as e:
        raise APIError(
            400,
            f"{field} is not a readable PNG, JPEG or WebP image ({type(e).__name__})",
            param=field,
        ) from None
    image: Image.Image = opened.convert("RGB")
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
