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

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Where `app.py` mounts STATIC_DIR.
STATIC_URL = "/static"
# The form's attention values until `GET /models` gives the chosen model's own (a live worker
# computes them for the model's default size): stock weights' top-k at the paper's 480p grid.
FORM_ATTENTION_DEFAULTS = {
    "backend": "vmoba",
    "select": "topk",
    "threshold": 0.25,
    "topk": [2, 6, 18],
    "dense_steps": 0.25,
}

router = APIRouter(tags=["page"])


@lru_cache(maxsize=1)
def page_html() -> str:
    """index.html with the form's fallback attention values (for a model whose `/models` entry
    has no `attention_defaults` yet) filled in."""
    data = json.dumps(FORM_ATTENTION_DEFAULTS).replace("</", "<\\/")
    return (
        (STATIC_DIR / "index.html")
        .read_text(encoding="utf-8")
        .replace("__ATTENTION_DEFAULTS__", data)
    )


@router.get("/", include_in_schema=False)
async def playground():
    """The playground page (the API docs stay at /docs)."""
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})
