"""The playground page at `/`: plain HTML, CSS and JavaScript from `service/static/` (no build
step, nothing fetched from elsewhere). It talks to the native routes like any other client: it
reads `GET /models`, submits with `POST /generate`, follows `GET /jobs/{id}/events` and lists
`GET /jobs`. See docs/playground.md.

The page and its files are public (`auth.OPEN_PATHS`): they carry no data, and the page asks for
the API key itself when the API answers 401.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import HTMLResponse

from ..schemas import AttentionRequest

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Where `app.py` mounts STATIC_DIR.
STATIC_URL = "/static"
# The request fields of `AttentionRequest` the page's form edits (the chunk sizes are left to the
# server, which chooses them for the video's grid).
ATTENTION_FIELDS = ("backend", "select", "threshold", "topk", "dense_steps")

router = APIRouter(tags=["page"])


@lru_cache(maxsize=1)
def page_html() -> str:
    """index.html with the attention defaults of `schemas.AttentionRequest` filled in, so the
    form's fallback defaults (for a model that lists no `attention_defaults`) are the server's."""
    defaults = {name: AttentionRequest.model_fields[name].default for name in ATTENTION_FIELDS}
    data = json.dumps(defaults).replace("</", "<\\/")
    return (
        (STATIC_DIR / "index.html")
        .read_text(encoding="utf-8")
        .replace("__ATTENTION_DEFAULTS__", data)
    )


@router.get("/", include_in_schema=False)
async def playground():
    """The playground page (the API docs stay at /docs)."""
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})
