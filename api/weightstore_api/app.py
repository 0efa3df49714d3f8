"""The FastAPI application: middleware, the error table, health/metrics, and every router.

``ROUTERS`` below is the whole HTTP surface: one module per resource, included in this order
(route matching is first-match, so the order is part of the contract). ``create_app`` takes a ready ``Context``
so tests and ``weightstore serve`` decide where the catalog and the object store are, and the
``collector`` (a ``CollectorPort``) that ``POST /v1/admin/gc/runs`` triggers: the API never imports
the collector package; the outermost layer injects it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from weightstore.collector import CollectorPort
from weightstore.context import Context
from weightstore.errors import WeightstoreError
from weightstore.health import Readiness, readiness_body
from weightstore.worker import WORKER_REGISTRY

from .deps import CurrentPrincipal
from .errors import database_error_handler, http_error_handler, validation_error_handler, weightstore_error_handler
from .limits import JsonBodyLimit
from .observability import REGISTRY, request_context, tenant_quota_metrics
from .routers import admin, billing, exports, gc, hub, native, retention, tenants, tinker, tinker_sessions, trash

# A background service started with the app and stopped with it: returns its stop function.
Background = Callable[[Context], Callable[[], None]]


ROUTERS = (
    admin.router,
    billing.router,
    exports.router,
    gc.router,
    native.router,
    retention.router,
    tenants.router,
    tinker.router,
    tinker_sessions.router,
    trash.router,
    hub.router,  # last: its /{namespace}/{name}/resolve/... paths must never shadow another route
)


def create_app(ctx: Context, *, background: Sequence[Background] = (), collector: CollectorPort | None = None) -> FastAPI:
    """The app over ``ctx``. ``background`` services start and stop with it; without a
    ``collector`` the collector cannot be triggered over HTTP (400 ``unsupported``) and its metrics
    are not in ``/metrics``."""
    stops: list[Callable[[], None]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for start in background:
            stops.append(start(ctx))
        try:
            yield
        finally:
            for stop in reversed(stops):
                stop()
            stops.clear()

    app = FastAPI(
        title="weightstore",
        version="0.1.0",
        lifespan=lifespan,
        description="Checkpoint and weights storage for LoRA fine-tuning, Tinker-compatible.",
        responses={
            400: {"description": "Invalid request (stable `code` in the body)"},
            401: {"description": "Missing, unknown or revoked API key"},
            403: {"description": "The key's role does not allow this"},
            404: {"description": "Not found (or another tenant's: indistinguishable)"},
            503: {"description": "Transient: object store or catalog busy; retry after Retry-After"},
        },
    )
    app.state.ctx = ctx
    app.state.collector = collector
    # inner first: the body limit runs inside request_context, so its refusals carry the request id
    app.add_middleware(JsonBodyLimit, max_bytes=ctx.settings.max_json_body_bytes)
    app.middleware("http")(request_context)
    app.add_exception_handler(WeightstoreError, weightstore_error_handler)
    app.add_exception_handler(SQLAlchemyError, database_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    @app.get("/healthz", operation_id="healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/version", operation_id="version", tags=["ops"])
    def version() -> dict[str, str]:
        """The server's version (``weightstore doctor`` compares it with the CLI's); no key needed."""
        return {"version": app.version}

    @app.get("/v1/whoami", operation_id="whoami", tags=["ops"])
    def whoami(principal: CurrentPrincipal) -> dict[str, str]:
        """The caller's key id, tenant and role (``weightstore doctor`` checks the role with it)."""
        return {"key_id": principal.key_id, "tenant_id": principal.tenant_id, "role": principal.role.value}

    readiness = Readiness.for_context(ctx)

    @app.get("/readyz", operation_id="readyz", tags=["ops"])
    def readyz(request: Request) -> JSONResponse:
        """503 naming each problem: ``catalog``, ``object_store`` (unreachable, or the embedded
        store being restarted by its supervisor), ``object_store_write`` (the cached write probe
        failed or was slower than its timeout)."""
        problems = readiness.problems()
        return JSONResponse(readiness_body(problems), status_code=503 if problems else 200)

    @app.get("/metrics", operation_id="metrics", tags=["ops"], include_in_schema=False)
    def metrics() -> Response:
        body = generate_latest(REGISTRY) + generate_latest(WORKER_REGISTRY) + tenant_quota_metrics(ctx)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    for router in ROUTERS:
        app.include_router(router)
    admin.install(app)  # static files and the sign-in redirect need more than include_router
    if collector is not None:
        gc.register_metrics(collector)  # the collector's metrics join /metrics
    return app
