"""Health, readiness and metrics of the roles without an API, and work directories of dead export
workers (issue 13, found 6 and 7).

- Export workers count jobs started, finished by outcome and their durations; a standalone worker
  serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``health_port``.
- The collector counts every tick by outcome, ``lease_held`` skips and failed runs included, and its
  health server reports a catalog it cannot reach.
- A killed worker's work directory (``data_dir/work/<job>-*``) is removed at the next worker's start
  unless a live lease holds its job, and the claimed job's old directories on takeover.
"""

from __future__ import annotations

import socket
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests.collector._util import principal
from weightstore import db, worker
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.health import HealthServer, Readiness, catalog_check, serve_health
from weightstore.models import ExportJob, ExportJobState
from weightstore_gc import lease, metrics, scheduler


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(ctx: Context, tenant_id: str, *, state: str, lease_seconds: float | None) -> str:
    job_id = f"exp_{uuid.uuid4().hex[:12]}"
    now = ctx.clock.now()
    with session_scope(ctx.engine) as s:
        s.add(
            ExportJob(
                id=job_id,
                tenant_id=tenant_id,
                source_checkpoint_id="ckpt_x",
                target="peft",
                request_key=job_id,
                state=state,
                created_at=now,
                lease_owner="dead-host:1" if lease_seconds is not None else None,
                lease_expires_at=now + timedelta(seconds=lease_seconds) if lease_seconds is not None else None,
            )
        )
    return job_id


def _work_dir(ctx: Context, job_id: str) -> Path:
    import tempfile

    root = worker.work_root(ctx)
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=root, prefix=f"{job_id}-"))  # exactly as exportjobs.run_job names it
    (d / "adapter").mkdir()
    (d / "adapter" / "half-downloaded.safetensors").write_bytes(b"x" * 1024)
    return d


def test_dead_workers_work_dirs_are_reclaimed(ctx: Context, keys) -> None:  # type: ignore[no-untyped-def]
    """issue 13, found 6: at start, directories of jobs no live lease holds go; a live one stays
    until its job is claimed by this worker (takeover), which removes the dead attempt's directory."""
    tenant = principal(ctx, keys.trainer).tenant_id
    live = _job(ctx, tenant, state=ExportJobState.running, lease_seconds=120)
    expired = _job(ctx, tenant, state=ExportJobState.running, lease_seconds=-1)
    done = _job(ctx, tenant, state=ExportJobState.succeeded, lease_seconds=None)
    dirs = {name: _work_dir(ctx, job) for name, job in [("live", live), ("expired", expired), ("done", done)]}
    dirs["unknown"] = _work_dir(ctx, "exp_neverexisted")

    stop = threading.Event()
    stop.set()  # start, reclaim, and stop before the first claim
    assert worker.run_worker(ctx, stop) == 0
    assert sorted(p.name.rsplit("-", 1)[0] for p in worker.work_root(ctx).iterdir()) == [live]
    assert dirs["live"].exists()

    removed = worker.reclaim_work_dirs(ctx, claimed=live)  # this worker took the live job over
    assert removed == [dirs["live"]]
    assert list(worker.work_root(ctx).iterdir()) == []


def test_export_worker_metrics_count_outcomes(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 13, found 7: jobs started, finished by outcome (a crash included) and durations."""
    reg = worker.WORKER_REGISTRY
    before = {
        "started": _value(reg, "weightstore_export_jobs_started_total"),
        "succeeded": _value(reg, "weightstore_export_jobs_finished_total", outcome="succeeded"),
        "crashed": _value(reg, "weightstore_export_jobs_finished_total", outcome="crashed"),
        "seconds": _value(reg, "weightstore_export_job_seconds_count", outcome="succeeded"),
    }
    outcomes = iter(["succeeded", RuntimeError("boom")])

    def fake_run_job(ctx: Context, job: ExportJob, owner: str) -> str:
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        return out

    monkeypatch.setattr(worker.exportjobs, "run_job", fake_run_job)
    job = ExportJob(id="exp_a", tenant_id="t", source_checkpoint_id="c", target="peft", request_key="k")
    assert worker._run_observed(ctx, job, "me") == "succeeded"
    assert worker._run_observed(ctx, job, "me") == "crashed"
    assert _value(reg, "weightstore_export_jobs_started_total") == before["started"] + 2
    assert _value(reg, "weightstore_export_jobs_finished_total", outcome="succeeded") == before["succeeded"] + 1
    assert _value(reg, "weightstore_export_jobs_finished_total", outcome="crashed") == before["crashed"] + 1
    assert _value(reg, "weightstore_export_job_seconds_count", outcome="succeeded") == before["seconds"] + 1


def test_standalone_export_worker_serves_health(ctx: Context) -> None:
    """issue 13, found 7: ``weightstore worker`` with WEIGHTSTORE_HEALTH_PORT answers /healthz,
    /readyz (write probe included) and /metrics while it runs, and stops serving when it stops."""
    port = _free_port()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_worker, args=(ctx, stop, 0.05), kwargs={"health_port": port})
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                r = httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.ConnectError:
                stop.wait(0.05)
        assert r.json() == {"status": "ok"}
        ready = httpx.get(base + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json() == {"status": "ok", "problems": {}}
        text = httpx.get(base + "/metrics", timeout=5).text
        assert "weightstore_export_jobs_started_total" in text
        assert "weightstore_export_job_seconds" in text
    finally:
        stop.set()
        thread.join(10)
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/healthz", timeout=1)


def test_collector_ticks_count_lease_held_and_failures(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 13, found 7: skipped "lease held" ticks and failed runs are counted."""

    def ticks(outcome: str) -> float:
        return _value(metrics.GC_REGISTRY, "weightstore_gc_ticks_total", outcome=outcome)

    before = {o: ticks(o) for o in ("lease_held", "failed", "finished")}
    holder = lease.acquire(ctx.engine, ctx.clock, ttl_seconds=600, owner="other-collector")
    assert scheduler.collect_once(ctx, "me") == "lease_held"
    holder.release()
    assert scheduler.collect_once(ctx, "me") == "finished"

    def broken_run(*a: object, **k: object) -> None:
        raise RuntimeError("catalog exploded")

    monkeypatch.setattr(scheduler.runner, "run", broken_run)
    assert scheduler.collect_once(ctx, "me") == "failed"
    assert {o: ticks(o) - before[o] for o in before} == {"lease_held": 1, "failed": 1, "finished": 1}


def test_collector_health_server_reports_an_unreachable_catalog(ctx: Context, tmp_path: Path) -> None:
    """issue 13, found 7: the collector's health server: metrics, and 503 naming ``catalog``."""
    server = serve_health(ctx, [metrics.GC_REGISTRY], port=0, write_probe=False)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/readyz", timeout=10).json() == {"status": "ok", "problems": {}}
        assert "weightstore_gc_ticks_total" in httpx.get(base + "/metrics", timeout=5).text
    finally:
        server.stop()
    dead = db.make_engine(f"sqlite:///{tmp_path}/missing-dir/x.db")
    (tmp_path / "missing-dir").rmdir()  # make_engine created it: remove it so the connect fails
    broken = HealthServer("127.0.0.1", 0, Readiness({"catalog": catalog_check(dead)}), []).start()
    try:
        r = httpx.get(f"http://127.0.0.1:{broken.port}/readyz", timeout=10)
        assert r.status_code == 503
        assert r.json()["problems"] == {"catalog": "OperationalError"}  # the class, never the driver's message
    finally:
        broken.stop()
        dead.dispose()
