"""The one table that maps core errors to HTTP status codes and headers (``ERROR_TABLE``), and the
handlers that render every error in one body shape.

The rule: a *permanent* error is never 408, 409, 429 or 5xx, because the Tinker SDK retries those
for minutes. Transient errors (``TransientError``: store down, catalog busy, lease lost) are 503
with ``Retry-After``. The exceptions, each Tinker's own contract:

- ``Conflict`` → 409 with ``x-should-retry: false``: publish / unpublish of a checkpoint already in
  that state (the header stops the SDK's HTTP-layer retries);
- ``SessionFinished`` → 410: a heartbeat for a finished session (the status stops the SDK's
  heartbeat loop);
- ``DataLoss`` and unknown errors → 500: a broken invariant, for operators to look at.

Database errors that escape as SQLAlchemy exceptions (raised outside ``session_scope``: an
``engine.connect()`` in a route or dependency, a pool checkout) are classified by the core's one
rule (``weightstore.db.as_transient``) in ``database_error_handler``: a catalog that is restarting
or unreachable answers 503 ``catalog_unavailable`` + ``Retry-After`` like everything transient.

Every route lets core errors propagate to ``weightstore_error_handler``; none builds its own
status. (The admin UI's sign-in page renders its form instead of JSON, with ``status_for``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from weightstore import db
from weightstore import errors as e

RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class ErrorMapping:
    """How one error class goes on the wire."""

    error: type[e.WeightstoreError]
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    """Sent with every error of the class (and its subclasses)."""


ERROR_TABLE: tuple[ErrorMapping, ...] = (
    # most specific first: the first entry the error is an instance of wins
    ErrorMapping(e.AuthenticationFailed, 401),
    ErrorMapping(e.Forbidden, 403),
    ErrorMapping(e.NotFound, 404),
    ErrorMapping(e.Conflict, 409, {"x-should-retry": "false"}),  # Tinker: publish/unpublish when already in that state
    ErrorMapping(e.SessionFinished, 410),  # Tinker: stops the SDK's heartbeat loop
    ErrorMapping(e.QuotaExceeded, 413),
    ErrorMapping(e.TenantQuotaExceeded, 400),  # permanent: never 413/429/5xx (issue 12, part 2)
    ErrorMapping(e.InvalidRequest, 400),  # names, paths, TTL, formats, integrity, incomplete/expired uploads
    ErrorMapping(e.AlreadyExists, 400),  # permanent: never 409, the SDK would retry it
    ErrorMapping(e.InUse, 400),
    ErrorMapping(e.LeaseHeld, 423),
    ErrorMapping(e.CatalogUnavailable, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}),  # PostgreSQL restarting/unreachable
    ErrorMapping(e.TransientError, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}),  # store down, catalog busy, lease lost
    ErrorMapping(e.DataLoss, 500),
    ErrorMapping(e.ExportFailed, 422),
    ErrorMapping(e.WeightstoreError, 500),
)

_UNMAPPED = ErrorMapping(e.WeightstoreError, 500)


def mapping_for(exc: e.WeightstoreError) -> ErrorMapping:
    return next((m for m in ERROR_TABLE if isinstance(exc, m.error)), _UNMAPPED)


def status_for(exc: e.WeightstoreError) -> int:
    return mapping_for(exc).status


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_body(code: str, message: str, request: Request, **extra: object) -> dict[str, object]:
    # "detail" mirrors the message for clients (like the Tinker SDK) that show FastAPI's field.
    return {"code": code, "message": message, "detail": message, "request_id": request_id_of(request), **extra}


async def weightstore_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.WeightstoreError)
    mapping = mapping_for(exc)
    extra = {"details": exc.details} if exc.details else {}
    return JSONResponse(
        error_body(exc.code, exc.message, request, **extra), status_code=mapping.status, headers=dict(mapping.headers) or None
    )


async def database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A SQLAlchemy error that no ``session_scope`` translated: transient ones go out like the core
    error they stand for; anything else is re-raised (a 500 for operators, as before)."""
    transient = db.as_transient(exc)
    if transient is None:
        raise exc
    return await weightstore_error_handler(request, transient)


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
