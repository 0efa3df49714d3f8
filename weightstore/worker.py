"""The export worker loop: claim a job under a lease, run it, repeat.

Runs in-process in ``weightstore serve`` (``start_in_process``) and as standalone
``weightstore worker`` processes; any number of them, on any number of machines, may share one
catalog and one object store — the claim/lease/fence rules in ``exportjobs`` keep a job from running
twice and let a crashed worker's job be taken over once its lease expires.

Also owned here (issue 13, found 6 and 7):
- the worker's Prometheus metrics (``WORKER_REGISTRY``: jobs started and finished by outcome, job
  durations), in the API's ``/metrics`` and on a standalone worker's health port;
- reclaiming work directories (``data_dir/work/<job id>-*``) that a killed worker left behind:
  at start and whenever a job is claimed, every directory of a job that no live lease holds, and
  every older directory of the job just claimed, is removed.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlmodel import col

from weightstore import exportjobs
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.models import ExportJob, ExportJobState

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0
ERROR_PAUSE_SECONDS = 5.0

WORKER_REGISTRY = CollectorRegistry(auto_describe=True)
JOBS_STARTED = Counter(
    "weightstore_export_jobs_started_total", "Export jobs claimed and started by this process", registry=WORKER_REGISTRY
)
JOBS_FINISHED = Counter(
    "weightstore_export_jobs_finished_total",
    "Export job attempts by how this process left them (succeeded, failed, queued for a retry, lost, crashed)",
    ["outcome"],
    registry=WORKER_REGISTRY,
)
JOB_SECONDS = Histogram(
    "weightstore_export_job_seconds",
    "Export job attempt duration by outcome",
    ["outcome"],
    registry=WORKER_REGISTRY,
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200),
)
CLAIM_FAILURES = Counter(
    "weightstore_export_claim_failures_total", "Claims that failed (catalog unreachable)", registry=WORKER_REGISTRY
)
WORK_DIRS_RECLAIMED = Counter(
    "weightstore_export_work_dirs_reclaimed_total", "Work directories of dead workers removed", registry=WORKER_REGISTRY
)


def work_root(ctx: Context) -> Path:
    """Where ``exportjobs.run_job`` makes each attempt's directory (``<job id>-<random>``)."""
    return Path(ctx.settings.data_dir) / "work"


def _job_of(directory: Path) -> str:
    return directory.name.rsplit("-", 1)[0]  # job ids have no "-"; mkdtemp appends "-<random>" via its prefix


def reclaim_work_dirs(ctx: Context, *, claimed: str | None = None, root: Path | None = None) -> list[Path]:
    """Remove work directories left by workers that died (``kill -9``): those of jobs no live lease
    holds, and (``claimed``: the job this worker just took, before it makes its own) every directory
    of that job. Returns the removed paths.

    The directories are listed before the catalog is read: a directory made after a claim that
    committed before the read belongs to a live lease and is kept."""
    root = root or work_root(ctx)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir()]
    if not dirs:
        return []
    now = ctx.clock.now()
    with session_scope(ctx.engine) as s:
        held = {
            r[0]
            for r in s.execute(
                sa.select(col(ExportJob.id)).where(
                    col(ExportJob.id).in_({_job_of(d) for d in dirs}),
                    col(ExportJob.state) == ExportJobState.running,
                    col(ExportJob.lease_expires_at) >= now,
                )
            ).all()
        }
    removed = []
    for d in dirs:
        job_id = _job_of(d)
        if job_id not in held or job_id == claimed:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        WORK_DIRS_RECLAIMED.inc(len(removed))
        log.info("export worker: removed %d work dir(s) of dead attempts: %s", len(removed), [d.name for d in removed])
    return removed


def _reclaim_quietly(ctx: Context, *, claimed: str | None = None) -> None:
    try:
        reclaim_work_dirs(ctx, claimed=claimed)
    except Exception:  # noqa: BLE001 - leftover directories are garbage, never a reason to stop
        log.warning("export worker: could not reclaim work directories", exc_info=True)


def run_worker(
    ctx: Context,
    stop_event: threading.Event,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    *,
    owner: str | None = None,
    max_jobs: int | None = None,
    health_port: int = 0,
) -> int:
    """Run jobs until ``stop_event`` is set (or ``max_jobs`` have run). Returns jobs run.

    An idle worker polls every ``poll_seconds``; a worker that just finished a job asks again at
    once, so a batch drains without waiting. A catalog outage pauses the loop instead of ending it.
    ``health_port`` (standalone workers): serve ``/healthz``, ``/readyz`` and ``/metrics`` there.
    """
    owner = owner or exportjobs.default_owner()
    ran = 0
    health = None
    if health_port:
        from weightstore.health import serve_health

        health = serve_health(ctx, [WORKER_REGISTRY], port=health_port)
        log.info("export worker %s: health and metrics on port %d", owner, health.port)
    log.info("export worker %s started", owner)
    _reclaim_quietly(ctx)
    try:
        while not stop_event.is_set():
            try:
                job = exportjobs.claim(ctx, owner)
            except Exception:  # noqa: BLE001 - the catalog may be briefly unreachable; keep the worker alive
                CLAIM_FAILURES.inc()
                log.warning("export worker %s: claim failed", owner, exc_info=True)
                stop_event.wait(ERROR_PAUSE_SECONDS)
                continue
            if job is None:
                stop_event.wait(poll_seconds)
                continue
            _reclaim_quietly(ctx, claimed=job.id)
            _run_observed(ctx, job, owner)
            ran += 1
            if max_jobs is not None and ran >= max_jobs:
                break
    finally:
        if health is not None:
            health.stop()
    log.info("export worker %s stopped after %d job(s)", owner, ran)
    return ran


def _run_observed(ctx: Context, job: ExportJob, owner: str) -> str:
    """Run one claimed job and count it (started, outcome, duration)."""
    log.info("export worker %s: running job %s (attempt %d)", owner, job.id, job.attempts)
    JOBS_STARTED.inc()
    started = time.perf_counter()
    outcome = "crashed"
    try:
        outcome = str(exportjobs.run_job(ctx, job, owner))
    except Exception:  # noqa: BLE001 - run_job records failures itself; this is a last resort
        log.exception("export worker %s: job %s crashed; its lease will expire and it is retried", owner, job.id)
    finally:
        JOBS_FINISHED.labels(outcome).inc()
        JOB_SECONDS.labels(outcome).observe(time.perf_counter() - started)
    return outcome


def start_in_process(ctx: Context, *, poll_seconds: float = DEFAULT_POLL_SECONDS, owner: str | None = None) -> Callable[[], None]:
    """Start a worker thread (for ``weightstore serve`` and tests); returns its stop function.
    Stopping waits for the current job's step to end (a job cut short is retried after its lease)."""
    stop_event = threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(ctx, stop_event, poll_seconds), kwargs={"owner": owner}, name="export-worker", daemon=True
    )
    thread.start()

    def stop() -> None:
        stop_event.set()
        thread.join(timeout=30)

    return stop


__all__ = ["WORKER_REGISTRY", "reclaim_work_dirs", "run_worker", "start_in_process", "work_root"]
