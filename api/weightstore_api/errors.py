"""The one table that maps core errors to HTTP status codes.

Permanent errors never get 408/409/429/5xx (the Tinker SDK retries those for minutes); the only
409 is ``Conflict``, which Tinker's contract uses for publish/unpublish of a checkpoint already in
that state. Transient errors are 503 with ``Retry-After``.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from weightstore import errors as e

STATUS_BY_CLASS: list[tuple[type[e.WeightstoreError], int]] = [
    # most specific first
    (e.AuthenticationFailed, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),  # Tinker: publish/unpublish when already in that state
    (e.QuotaExceeded, 413),
    (e.InvalidRequest, 400),  # names, paths, TTL, formats, integrity, incomplete/expired uploads
    (e.AlreadyExists, 400),  # permanent: never 409, the SDK would retry it
    (e.InUse, 400),
    (e.LeaseHeld, 423),
    (e.TransientError, 503),  # store down, catalog busy, lease lost: retry
    (e.DataLoss, 500),
    (e.ExportFailed, 422),
    (e.WeightstoreError, 500),
]

RETRY_AFTER_SECONDS = 5


def status_for(exc: e.WeightstoreError) -> int:
    for cls, status in STATUS_BY_CLASS:
        if isinstance(exc, cls):
            return status
    return 500


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_body(code: str, message: str, request: Request, **extra: object) -> dict[str, object]:
    # "detail" mirrors the message for clients (like the Tinker SDK) that show FastAPI's field.
    return {"code": code, "message": message, "detail": message, "request_id": request_id_of(request), **extra}


async def weightstore_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.WeightstoreError)
    status = status_for(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.retryable else None
    extra = {"details": exc.details} if exc.details else {}
    return JSONResponse(error_body(exc.code, exc.message, request, **extra), status_code=status, headers=headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = [{"loc": list(err.get("loc", ())), "msg": err.get("msg")} for err in exc.errors()]
    msg = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in errs) or "invalid request"
    return JSONResponse(error_body("invalid_request", msg, request, errors=errs), status_code=400)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Framework errors (unknown route, wrong method) in the same body shape as ours."""
    from starlette.exceptions import HTTPException

    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated", 403: "forbidden"}.get(
        exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error"
    )
    return JSONResponse(
        error_body(code, str(exc.detail), request), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )
