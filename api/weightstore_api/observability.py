"""Structured JSON logs with request ids, and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from weightstore import tenants
from weightstore.context import Context
from weightstore.db import session_scope

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter("weightstore_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("weightstore_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY)
BYTES_RECEIVED = Counter(
    "weightstore_upload_bytes_total", "Bytes received through the streaming upload endpoint", registry=REGISTRY
)
CHECKPOINTS_COMMITTED = Counter("weightstore_checkpoints_committed_total", "Checkpoints committed", ["kind"], registry=REGISTRY)


def tenant_quota_metrics(ctx: Context) -> bytes:
    """Per-tenant quota gauges, computed on each scrape from the catalog (two grouped statements):
    ``weightstore_tenant_used_bytes`` for every tenant not deleted, and for tenants with a (soft)
    quota its size and ``used / quota`` (``..._quota_used_ratio``, ``..._soft_quota_used_ratio``:
    alert at >= 1). A fresh registry per scrape, so a deleted tenant's series disappear."""
    reg = CollectorRegistry()
    used_g = Gauge("weightstore_tenant_used_bytes", "Logical bytes counted against the quota", ["tenant"], registry=reg)
    quota_g = Gauge("weightstore_tenant_quota_bytes", "Hard quota (logical bytes)", ["tenant"], registry=reg)
    soft_g = Gauge("weightstore_tenant_soft_quota_bytes", "Soft quota (logical bytes)", ["tenant"], registry=reg)
    ratio_g = Gauge("weightstore_tenant_quota_used_ratio", "Used bytes / hard quota", ["tenant"], registry=reg)
    soft_ratio_g = Gauge("weightstore_tenant_soft_quota_used_ratio", "Used bytes / soft quota", ["tenant"], registry=reg)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        rows = tenants.list_tenants(session, include_deleted=False)
        used = tenants.usage_all(session, now=now)
    for t in rows:
        n = used[t.id].used_bytes if t.id in used else 0
        used_g.labels(t.id).set(n)
        for limit, size_g, share_g in ((t.quota_bytes, quota_g, ratio_g), (t.soft_quota_bytes, soft_g, soft_ratio_g)):
            if limit is not None:
                size_g.labels(t.id).set(limit)
                share_g.labels(t.id).set(n / limit if limit else float("inf") if n else 0.0)
    return generate_latest(reg)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the request id rides along from the context variable."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key in ("method", "path", "status", "duration_ms", "tenant_id", "code"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("weightstore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


access_log = logging.getLogger("weightstore.access")


def _route_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex
    rid = rid[:64]
    request.state.request_id = rid
    token = request_id_var.set(rid)
    start = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        response.headers["X-Request-ID"] = rid
        return response
    finally:
        elapsed = time.perf_counter() - start
        route = _route_of(request)
        HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
        HTTP_LATENCY.labels(request.method, route).observe(elapsed)
        # Never log headers or query strings: keys and presigned signatures live there.
        access_log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.url.path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 1),
                "tenant_id": getattr(request.state, "tenant_id", None),
            },
        )
        request_id_var.reset(token)
