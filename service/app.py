"""The FastAPI app. Never imports torch (the worker does the heavy work).

```bash
uvicorn --factory service.app:create_app --port 8000     # or: make serve
```

Routes: `routes.native` (`/generate`, `/jobs...`), `routes.openai` (`/v1/videos...`),
`routes.ops` (`/healthz`, `/readyz`, `/metrics`, `/models`), `routes.page` (the playground page
at `/`, its files under `/static`). Errors: `errors` (one envelope).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

import anyio
from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from . import openapi
from .auth import AuthMiddleware
from .errors import install_error_handlers
from .http import HeaderTimeoutProtocol
from .metrics import MetricsMiddleware
from .routes import native, openai, ops, page
from .settings import ServiceSettings, get_settings
from .state import open_state

log = logging.getLogger("service")


def create_app(settings: Optional[ServiceSettings] = None) -> FastAPI:
    """An app for `settings` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = open_state(settings)
        app.state.vmoba = state
        try:
            await anyio.to_thread.run_sync(state.prime)
        except Exception as e:  # Redis down at start: requests will say so (503)
            log.warning("could not reach Redis at startup: %s", e)
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="vmoba-serve",
        version="0.1.0",
        lifespan=lifespan,
        description="Text-to-video with Wan + VMoBA sparse attention. Native routes "
        "and the OpenAI Videos format (/v1/videos).",
    )
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.mount(page.STATIC_URL, StaticFiles(directory=page.STATIC_DIR), name="static")
    # Outermost last: metrics see every answer, 401s included.
    app.add_middleware(AuthMiddleware, keys=settings.api_keys, admin_keys=settings.admin_api_keys)
    app.add_middleware(MetricsMiddleware)
    HeaderTimeoutProtocol.header_timeout_s = settings.HEADER_TIMEOUT_S
    specs = settings.models()
    openapi.install(app, [settings.limits_for(s) for s in specs], [s.id for s in specs])
    return app
