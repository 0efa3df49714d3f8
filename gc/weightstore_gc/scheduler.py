"""APScheduler 3.x wiring: in-process for ``weightstore serve`` and a standalone worker loop.

Every replica may run a scheduler: the database lease makes sure only one collects at a time, the
others log "lease held" and try again at the next tick. Jobs use the in-memory job store (a
persistent store would pickle the ``Context``); ``coalesce`` and ``max_instances=1`` keep a slow
run from piling up behind itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from weightstore.context import Context
from weightstore.errors import LeaseHeld, LeaseLost

from . import lease, metrics, runner

log = logging.getLogger("weightstore.gc")
FIRST_RUN_DELAY_SECONDS = 30  # let the service finish starting before the first collection


def collect_once(ctx: Context, owner: str) -> str:
    """One scheduled collection. Returns its outcome (counted in ``metrics.TICKS``); never raises
    (a scheduler job must not die)."""
    outcome = _collect(ctx, owner)
    metrics.TICKS.labels(outcome).inc()
    return outcome


def _collect(ctx: Context, owner: str) -> str:
    try:
        rep = runner.run(ctx, owner=owner)
        log.info("gc run %s %s: %s", rep.run_id, rep.state, rep.stats)
        return str(rep.state)
    except LeaseHeld:
        log.info("gc: lease held by another collector; skipping this tick")
        return "lease_held"
    except LeaseLost:
        log.warning("gc: lease lost mid-run; stopped")
        return "lease_lost"
    except Exception:  # noqa: BLE001 - logged; the next tick retries
        log.exception("gc run failed")
        return "failed"


def _add_job(sched: BackgroundScheduler | BlockingScheduler, ctx: Context, first_delay: float) -> None:
    sched.add_job(
        collect_once,
        IntervalTrigger(seconds=ctx.settings.gc_interval_seconds),
        args=(ctx, lease.new_owner()),
        id="weightstore-gc",
        name="weightstore garbage collector",
        coalesce=True,
        max_instances=1,
        next_run_time=datetime.now(UTC) + timedelta(seconds=first_delay),
        replace_existing=True,
    )


def start_in_process(ctx: Context, *, first_delay: float = FIRST_RUN_DELAY_SECONDS) -> Callable[[], None]:
    """Start the collector on a background thread; returns the function that stops it."""
    sched = BackgroundScheduler(timezone=UTC, daemon=True)
    _add_job(sched, ctx, first_delay)
    sched.start()

    def stop() -> None:
        if sched.running:
            sched.shutdown(wait=False)

    return stop


def run_worker(ctx: Context, *, first_delay: float = 0) -> None:
    """Blocking loop for ``weightstore gc worker`` (production: one or more standalone workers).
    With ``WEIGHTSTORE_HEALTH_PORT`` set it serves ``/healthz``, ``/readyz`` (catalog and store
    reachable) and ``/metrics`` (the collector's) there."""
    health = None
    if ctx.settings.health_port:
        from weightstore.health import serve_health

        # no write probe: the collector only deletes, and a probe would be a write it never makes
        health = serve_health(ctx, [metrics.GC_REGISTRY], write_probe=False)
        log.info("gc worker: health and metrics on port %d", health.port)
    sched = BlockingScheduler(timezone=UTC)
    _add_job(sched, ctx, first_delay)
    try:
        sched.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if health is not None:
            health.stop()
