"""Optional API keys: `Authorization: Bearer <key>` against `API_KEYS` (comma-separated).

Off when `API_KEYS` is empty. Health checks (`/healthz`, `/readyz`), the API docs and the playground
page (`/` and its files under `/static/`: no data; the page asks for the key) stay open.
"""

from __future__ import annotations

import hmac

from .errors import APIError, error_response

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"}
)
OPEN_PREFIXES = ("/static/",)


def key_of(scope) -> str:
    """The bearer key of a request ('' when none)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else ""
    return ""


class AuthMiddleware:
    """Pure ASGI middleware: 401 in the error envelope unless the bearer key is accepted."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or not self.keys
            or scope["path"] in OPEN_PATHS
            or scope["path"].startswith(OPEN_PREFIXES)
        ):
            return await self.app(scope, receive, send)
        given = key_of(scope).encode()
        # Compare against every key (constant time per key) so timing tells nothing.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        if ok:
            return await self.app(scope, receive, send)
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if not given
            else "invalid API key"
        )
        response = error_response(APIError(401, message, headers={"WWW-Authenticate": "Bearer"}))
        await response(scope, receive, send)
