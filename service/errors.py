"""API errors in one envelope (OpenAI's), on every route: `{"error": {message, type, param, code}}`.

Bad input is a 4xx whose message says what was wrong and what is allowed; nothing reaches the client
as a traceback. `install_error_handlers(app)` maps:

- `APIError` (raised by our code) -> its status;
- pydantic `ValidationError` / FastAPI `RequestValidationError` -> 400 `invalid_request`;
- Starlette `HTTPException` (unknown route, wrong method) -> its status; a 405's `Allow` names
  every method the path takes (all its routes, not only the first one matched);
- the client hanging up before its request body arrived (`ClientDisconnect`) -> 499 (nginx's
  "client closed request"; nobody reads it), logged at INFO: not a server error;
- Redis being unreachable -> 503; results storage being unreachable (`StorageUnavailable`) -> 503
  `storage_unavailable` + `Retry-After`; anything else -> 500 `internal_error` (logged, never
  shown).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from contract.storage import StorageUnavailable

from .responses import JSON

log = logging.getLogger("service")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    416: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    408: "request_timeout",
    415: "unsupported_media_type",
    429: "queue_full",
    503: "unavailable",
}


class APIError(Exception):
    """An error answer: HTTP `status`, a message naming the bad value and what is allowed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: Optional[str] = None,
        param: Optional[str] = None,
        type_: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(
            status, "invalid_request" if status < 500 else "internal_error"
        )
        self.param = param
        self.type = type_ or _TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.headers = headers or {}


def error_body(message: str, *, type_: str, code: Optional[str], param: Optional[str]) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError) -> JSON:
    return JSON(
        error_body(err.message, type_=err.type, code=err.code, param=err.param),
        status_code=err.status,
        headers=err.headers,
    )


# Status recorded for requests whose client went away before they were read (nginx's).
CLIENT_CLOSED_REQUEST = 499


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at this request's path (asked of the router
    itself, one method at a time, so included routers count too)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    ]


def not_found(job_id: Any) -> APIError:
    return APIError(
        404,
        f"no job with id {str(job_id)[:100]!r} (ids look like video_<32 hex>; "
        "finished jobs are kept until their expires_at)",
        param="id",
    )


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union members show up as type names in locations (e.g. "topk.int"); they help nobody.
    parts = [
        p
        for p in parts
        if p not in ("int", "tuple[int, int, int]", "function-after[...]")
        and not p.startswith("function-")
    ]
    return ".".join(parts)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, Optional[str]]:
    """One readable sentence from pydantic errors, and the first offending field."""
    msgs, first = [], None
    for e in errors:
        loc = _loc(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value"))
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (not allowed)"
        elif e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        text = msg if not loc or msg.startswith(loc.split(".")[-1]) else f"{loc}: {msg}"
        if text not in msgs:
            msgs.append(text)
        first = first or (loc or None)
    return "; ".join(msgs) or "invalid request", first


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    message, param = validation_message(exc.errors())
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            message = (
                f"method {request.method} is not allowed on {request.url.path}; "
                f"allowed: {headers.get('Allow', 'none')}"
            )
        return error_response(APIError(exc.status_code, message, headers=headers))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        log.info(
            "client hung up before its request was read: %s %s", request.method, request.url.path
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception):
        log.warning("redis unavailable: %s", exc)
        return error_response(
            APIError(
                503,
                "the job store (Redis) is unreachable; retry shortly",
                headers={"Retry-After": "5"},
            )
        )

    @app.exception_handler(StorageUnavailable)
    async def _storage_down(request: Request, exc: StorageUnavailable):
        # The details (endpoint, bucket) are for the operator's log, not for clients.
        log.warning("results storage unavailable: %s %s: %s", request.method, request.url.path, exc)
        state = getattr(request.app.state, "vmoba", None)
        retry_after = state.settings.RETRY_AFTER_S if state is not None else 10
        return error_response(
            APIError(
                503,
                "the results storage is unreachable; retry shortly",
                code="storage_unavailable",
                headers={"Retry-After": str(retry_after)},
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            APIError(500, "internal error (logged on the server)", code="internal_error")
        )
