"""Readiness that notices a store refusing writes or being restarted (issue 13, found 7 and the
issue 12 leftover).

- ``WriteProbe``: put + delete under ``health/`` at most once per interval, a failure or an answer
  slower than the timeout names ``object_store_write`` in ``/readyz``; the collector never sees
  the probe object (not counted, not deleted, not reported by ``verify``).
- The embedded supervisor: while it restarts SeaweedFS, ``/readyz`` is 503; whenever it answers
  200 during the restart, existing objects can be read (no early 200 before volumes are back).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from weightstore.context import Context
from weightstore.embedded import SeaweedFS, supervisor_for
from weightstore.errors import StoreUnavailable
from weightstore.health import PROBE_PREFIX, WriteProbe
from weightstore.objectstore import ObjectStore, S3Location
from weightstore_api.app import create_app
from weightstore_gc import run, verify

EXISTING = os.urandom(4 * 1024 * 1024)  # big enough to live in a volume, not inline in the filer


class _Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_write_probe_caches_fails_and_recovers(ctx: Context) -> None:
    """issue 13, found 7: one put+delete per interval; a refused write is a problem until a later
    probe succeeds; the probe object is removed."""
    ticks = _Ticks()
    probe = WriteProbe(ctx.store, interval=30, timeout=5, clock=ticks)
    calls: list[str] = []
    real_put = ctx.store.put_bytes
    refuse = threading.Event()

    def put_bytes(key: str, data: bytes, **kw: object) -> bool:
        calls.append(key)
        if refuse.is_set():
            raise StoreUnavailable("put: object store error 500")
        return real_put(key, data)

    ctx.store.put_bytes = put_bytes  # type: ignore[method-assign]  # fault injection on this instance
    assert probe.problem() is None
    assert probe.problem() is None  # cached: no second write
    assert len(calls) == 1 and calls[0].startswith(PROBE_PREFIX)
    assert ctx.store.head(calls[0]) is None  # put, then deleted
    refuse.set()
    ticks.now += 29
    assert probe.problem() is None and len(calls) == 1  # still inside the interval
    ticks.now += 2
    assert probe.problem() == "write failed (StoreUnavailable: put: object store error 500)"
    assert len(calls) == 2
    refuse.clear()
    ticks.now += 31
    assert probe.problem() is None


def test_readyz_names_a_slow_write(ctx: Context) -> None:
    """issue 13, found 7: a store that takes longer than the timeout to answer a write (out of
    writable volumes: 30 s then 500) is not ready, and ``/readyz`` says ``object_store_write``
    within the timeout instead of hanging."""
    ctx.settings = ctx.settings.model_copy(update={"readiness_write_probe_timeout_seconds": 0.3})
    release = threading.Event()
    real_put = ctx.store.put_bytes

    def stuck_put(key: str, data: bytes, **kw: object) -> bool:
        release.wait(30)
        return real_put(key, data)

    ctx.store.put_bytes = stuck_put  # type: ignore[method-assign]  # fault injection on this instance
    try:
        with TestClient(create_app(ctx)) as client:
            r = client.get("/readyz")
            assert r.status_code == 503
            assert set(r.json()["problems"]) == {"object_store_write"}
            assert r.json()["problems"]["object_store_write"].startswith("write unanswered after 0.")
            release.set()
            deadline = time.monotonic() + 10
            while "unanswered" in (problem := client.get("/readyz").json()["problems"]["object_store_write"]):
                assert time.monotonic() < deadline, problem
                time.sleep(0.05)
            # it answered at last, too slowly: still not ready (cached for the probe interval)
            assert problem.startswith("write took ") and problem.endswith("(timeout 0.3 s)"), problem
            assert client.get("/readyz").status_code == 503
    finally:
        release.set()


def test_probe_object_is_invisible_to_the_collector(ctx: Context, clock) -> None:  # type: ignore[no-untyped-def]
    """issue 13, found 7: a probe object left behind (delete failed) is never counted, deleted or
    reported by the collector."""
    key = f"{PROBE_PREFIX}write-probe/leftover"
    ctx.store.put_bytes(key, b"ok")
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    rep = run(ctx)
    assert rep.state == "finished"
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    run(ctx)
    assert ctx.store.head(key) is not None
    assert verify(ctx, expect_collected=True).findings == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_readyz_is_503_while_the_embedded_store_restarts(ctx: Context, tmp_path: Path) -> None:
    """issue 12 leftover: ``/readyz`` reads the supervisor. From the child's death until the
    restarted store serves reads it is 503 ``object_store``. Before, it answered 200 as soon as the S3
    gateway listened again, before the supervisor's restart was complete (volumes not yet known)."""
    weed = SeaweedFS(tmp_path / "s3", access_key="readyz", secret_key="readyz-secret")
    weed.start()
    endpoint = weed.endpoint_url
    try:
        store = ObjectStore(S3Location(weed.endpoint_url, "readyz", "readyz-secret", "ready"))
        store.ensure_bucket()
        store.put_bytes("blobs/sha256/aa/probe-read", EXISTING)
        settings = ctx.settings.model_copy(
            update={"s3_endpoint_url": weed.endpoint_url, "s3_bucket": "ready", "readiness_write_probe_seconds": 0}
        )
        app_ctx = Context(settings=settings, engine=ctx.engine, store=store, clock=ctx.clock)
        assert supervisor_for(weed.endpoint_url) is weed
        with TestClient(create_app(app_ctx)) as client:
            assert client.get("/readyz").status_code == 200
            pid = weed.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while weed.running:  # the kill lands; the supervisor's watchdog notices within 0.5 s
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = client.get("/readyz")
            assert r.status_code == 503
            assert r.json()["problems"]["object_store"] == "embedded store restarting"
            seen_503 = True
            deadline = time.monotonic() + 60
            while True:
                r = client.get("/readyz")
                if r.status_code == 200:
                    # ready means the supervisor's restart is complete (volumes known again), and
                    # the existing object is readable at this very moment
                    assert weed.restarts == 1
                    assert store.read_bytes("blobs/sha256/aa/probe-read") == EXISTING
                    break
                seen_503 = seen_503 and r.json()["problems"]["object_store"].startswith(("embedded store", "StoreUnavailable"))
                assert time.monotonic() < deadline, "the store never came back"
                time.sleep(0.1)
            assert seen_503
    finally:
        weed.stop()
    assert supervisor_for(endpoint) is None


def test_health_endpoints_answer_without_a_key(ctx: Context) -> None:
    """issue 13, found 7: the API's health, readiness (with the write probe) and metrics (the
    export worker's included)."""
    with TestClient(create_app(ctx)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ok", "problems": {}}
        assert "weightstore_export_jobs_started_total" in client.get("/metrics").text
