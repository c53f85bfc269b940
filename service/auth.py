"""Optional API keys: `Authorization: Bearer <key>` against `API_KEYS` and `ADMIN_API_KEYS`
(comma-separated), and who a request acts as (`Principal`).

Off when both are empty: every request may see every job. On, each job belongs to the key that
created it (its record holds `contract.keys.owner_id(key)`, a hash, never the key): another key
gets a 404 for it on every route and never finds it in a listing; an admin key sees all jobs.
Health checks (`/healthz`, `/readyz`), the API docs and the playground page (`/` and its files under
`/static/`: no data; the page asks for the key) stay open.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Optional

from contract.keys import owner_id

from .errors import APIError, error_response

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"}
)
OPEN_PREFIXES = ("/static/",)
# Where the middleware leaves the request's `Principal` in the ASGI scope.
SCOPE_KEY = "vmoba.principal"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: `owner` goes into the records it creates; `admin` sees every job.
    `authenticated`: a key was checked (False when keys are off, or on an open path without
    a valid key)."""

    owner: str
    admin: bool
    authenticated: bool = False

    def sees(self, record_owner: str) -> bool:
        return self.admin or record_owner == self.owner

    @property
    def list_owner(self) -> Optional[str]:
        """The owner whose jobs a listing shows; None: every job."""
        return None if self.admin else self.owner


# Keys off: one shared space, everyone sees everything.
OPEN = Principal(owner="", admin=True)
# Keys on, no valid key (open paths only): sees nothing.
NOBODY = Principal(owner="\0nobody", admin=False)


def key_of(scope) -> str:
    """The bearer key of a request ('' when none)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else ""
    return ""


def principal_of(scope: Any) -> Principal:
    """The `Principal` the middleware found for a request (a `Request` or an ASGI scope)."""
    scope = getattr(scope, "scope", scope)
    return scope.get(SCOPE_KEY, OPEN)


class AuthMiddleware:
    """Pure ASGI middleware: 401 in the error envelope unless the bearer key is accepted; puts the
    request's `Principal` into the scope (`principal_of`)."""

    def __init__(self, app, keys: tuple[str, ...], admin_keys: tuple[str, ...] = ()):
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.admin_keys = tuple(k.encode() for k in admin_keys)
        self.on = bool(self.keys or self.admin_keys)

    def identify(self, given: bytes) -> Optional[Principal]:
        # Compare against every key (constant time per key) so timing tells nothing.
        user = admin = False
        for key in self.keys:
            user |= hmac.compare_digest(given, key)
        for key in self.admin_keys:
            admin |= hmac.compare_digest(given, key)
        if not (user or admin) or not given:
            return None
        return Principal(owner_id(given.decode("latin-1")), admin=admin, authenticated=True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.on:
            return await self.app(scope, receive, send)
        given = key_of(scope).encode("latin-1")
        principal = self.identify(given)
        scope[SCOPE_KEY] = principal or NOBODY
        if principal is not None or (
            scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES)
        ):
            return await self.app(scope, receive, send)
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if not given
            else "invalid API key"
        )
        response = error_response(APIError(401, message, headers={"WWW-Authenticate": "Bearer"}))
        await response(scope, receive, send)
