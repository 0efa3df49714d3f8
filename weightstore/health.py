"""Readiness checks shared by every role, and the small health server of the roles without an API.

``Readiness`` answers "may this process take work now?" as a dict of named problems (empty: ready):

- ``catalog``: a ``select 1`` on the engine;
- ``object_store``: the store answers (``ping``) and, when this process supervises an embedded
  SeaweedFS on that endpoint, the supervisor is not restarting it (``embedded.supervisor_for``);
- ``object_store_write``: a ``WriteProbe`` put and deleted a tiny object under ``PROBE_PREFIX``
  within its timeout, at most once per interval (issue 13, found 7: a store out of writable volumes
  answers every read and refuses, slowly, every write).

The API serves ``/readyz`` from it; a standalone collector or export worker serves ``/healthz``,
``/readyz`` and ``/metrics`` with ``serve_health`` (stdlib ``http.server`` on a thread) when
``WEIGHTSTORE_HEALTH_PORT`` is set.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

from weightstore.context import Context
from weightstore.db import unavailable_reason
from weightstore.objectstore import BLOB_PREFIX, STAGING_PREFIX, ObjectStore

PROBE_PREFIX = "health/"
"""Where write probes go. The collector lists only ``blobs/`` and ``staging/`` (sweep, orphans,
verify), so a probe object is never counted, reported or deleted by it."""
assert not PROBE_PREFIX.startswith((BLOB_PREFIX, STAGING_PREFIX))

Check = Callable[[], str | None]
"""A readiness check: ``None`` when fine, else a short problem for ``/readyz``."""


def _describe(exc: BaseException) -> str:
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def catalog_check(engine: Engine) -> Check:
    """The catalog answers ``select 1``. The problem names the error class and the classified reason
    (``db.unavailable_reason``), never the driver's message: ``/readyz`` needs no key, and driver
    messages carry hosts and SQL."""

    def check() -> str | None:
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
            reason = unavailable_reason(exc)
            return f"{type(exc).__name__} ({reason})" if reason else type(exc).__name__
        return None

    return check


def store_check(store: ObjectStore, endpoint_url: str | None) -> Check:
    def check() -> str | None:
        from weightstore import embedded  # stdlib only; the supervisor registry lives there

        supervisor = embedded.supervisor_for(endpoint_url) if endpoint_url else None
        if supervisor is not None:
            problem = supervisor.readiness_problem()
            if problem is not None:
                return f"embedded store {problem}"
        try:
            store.ping()
        except Exception as exc:  # noqa: BLE001
            return _describe(exc)
        return None

    return check


class WriteProbe:
    """Put and delete a tiny object under ``PROBE_PREFIX``; the outcome is cached for ``interval``
    seconds, and a probe still unanswered after ``timeout`` seconds is a failure (the request that
    asked does not wait longer; the probe finishes in the background and the next one starts once it
    has). One key per process, so replicas never delete each other's probe mid-check."""

    def __init__(
        self, store: ObjectStore, *, interval: float, timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.key = f"{PROBE_PREFIX}write-probe/{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._running: tuple[float, concurrent.futures.Future[float]] | None = None
        self._result: str | None = None
        self._checked_at: float | None = None

    def _probe(self) -> float:
        started = self.clock()
        self.store.put_bytes(self.key, b"ok")
        self.store.delete(self.key)
        return self.clock() - started

    def _start_probe(self) -> concurrent.futures.Future[float]:
        # A daemon thread, not an executor: a probe stuck on a dying store must not hold up exit.
        fut: concurrent.futures.Future[float] = concurrent.futures.Future()

        def probe() -> None:
            try:
                fut.set_result(self._probe())
            except BaseException as exc:  # noqa: BLE001 - handed to the reader through the future
                fut.set_exception(exc)

        threading.Thread(target=probe, name="write-probe", daemon=True).start()
        return fut

    def _outcome(self, fut: concurrent.futures.Future[float]) -> str | None:
        exc = fut.exception()
        if exc is not None:
            return f"write failed ({_describe(exc)})"
        took = fut.result()
        if took > self.timeout:
            return f"write took {took:.1f} s (timeout {self.timeout:g} s)"
        return None

    def problem(self) -> str | None:
        with self._lock:
            now = self.clock()
            if self._running is None:
                if self._checked_at is not None and now - self._checked_at < self.interval:
                    return self._result
                self._running = (now, self._start_probe())
            started, fut = self._running
        try:
            fut.result(timeout=max(0.0, self.timeout - (self.clock() - started)))
        except concurrent.futures.TimeoutError:
            return f"write unanswered after {self.clock() - started:.1f} s (timeout {self.timeout:g} s)"
        except Exception:  # noqa: BLE001 - read back below
            pass
        with self._lock:
            if self._running is not None and self._running[1] is fut:
                self._result, self._checked_at, self._running = self._outcome(fut), self.clock(), None
            return self._result


class Readiness:
    """Named checks; ``problems()`` runs them all and returns the failing ones."""

    def __init__(self, checks: Mapping[str, Check]) -> None:
        self.checks = dict(checks)

    def problems(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, check in self.checks.items():
            problem = check()
            if problem is not None:
                out[name] = problem
        return out

    @classmethod
    def for_context(cls, ctx: Context, *, write_probe: bool = True) -> Readiness:
        """The standard checks over ``ctx``: catalog, store (with its embedded supervisor) and, when
        ``write_probe`` and the setting allow, the write probe."""
        checks: dict[str, Check] = {
            "catalog": catalog_check(ctx.engine),
            "object_store": store_check(ctx.store, ctx.settings.s3_endpoint_url),
        }
        if write_probe and ctx.settings.readiness_write_probe_seconds > 0:
            probe = WriteProbe(
                ctx.store,
                interval=ctx.settings.readiness_write_probe_seconds,
                timeout=ctx.settings.readiness_write_probe_timeout_seconds,
            )
            checks["object_store_write"] = probe.problem
        return cls(checks)


def readiness_body(problems: Mapping[str, str]) -> dict[str, Any]:
    return {"status": "unavailable" if problems else "ok", "problems": dict(problems)}


class HealthServer:
    """``/healthz`` (the process answers), ``/readyz`` (``Readiness``) and ``/metrics`` (the given
    Prometheus registries) on a daemon thread. ``port`` 0 picks a free port (``self.port``)."""

    def __init__(self, host: str, port: int, readiness: Readiness, registries: Sequence[CollectorRegistry]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    outer._send(self, 200, "application/json", b'{"status": "ok"}')
                elif path == "/readyz":
                    problems = readiness.problems()
                    body = json.dumps(readiness_body(problems)).encode()
                    outer._send(self, 503 if problems else 200, "application/json", body)
                elif path == "/metrics":
                    outer._send(self, 200, CONTENT_TYPE_LATEST, b"".join(generate_latest(r) for r in registries))
                else:
                    outer._send(self, 404, "application/json", b'{"code": "not_found"}')

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds: no access log
                return None

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health-server", daemon=True)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, content_type: str, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_health(
    ctx: Context, registries: Sequence[CollectorRegistry], *, port: int | None = None, write_probe: bool = True
) -> HealthServer:
    """Start the health server of a standalone role on ``port`` (default ``settings.health_port``)."""
    readiness = Readiness.for_context(ctx, write_probe=write_probe)
    return HealthServer(ctx.settings.host, ctx.settings.health_port if port is None else port, readiness, registries).start()


__all__ = [
    "PROBE_PREFIX",
    "HealthServer",
    "Readiness",
    "WriteProbe",
    "catalog_check",
    "readiness_body",
    "serve_health",
    "store_check",
]
