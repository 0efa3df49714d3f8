"""Run collector phases under the lease and record the run (``gc_run``: plan, stats, findings).

``run(ctx, phases=PHASES)`` (expire, invoices, mark, sweep, orphans, archives) is what the scheduler
and ``weightstore gc run`` call; ``LocalCollector`` offers the same to the API as a
``weightstore.collector.CollectorPort``. A dry run takes no lease and changes nothing but its own
``gc_run`` / ``gc_live_blob`` rows. Outcomes (``GcRunState``): ``finished``, ``stopped`` (fail
closed: findings, nothing deleted after them), ``aborted`` (lease lost or an error).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from prometheus_client.registry import Collector as MetricsCollector
from sqlmodel import col

from weightstore.collector import PHASES
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import LeaseLost
from weightstore.models import GcLiveBlob, GcRun, GcRunState
from weightstore.names import new_id

from . import lease, metrics
from .hooks import NO_HOOKS, CollectorHooks
from .phases import Collection, Finding, PhaseResult, close_invoices, expire, mark, orphans, prune_archives, sweep

log = logging.getLogger("weightstore.gc")
KEEP_LIVE_SETS = 3  # saved live sets kept for inspection; older ones are dropped


@dataclass
class RunReport:
    run_id: str
    phases: list[str]
    dry_run: bool
    state: GcRunState = GcRunState.running
    plan: dict[str, dict[str, int]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "phases": self.phases,
            "dry_run": self.dry_run,
            "state": self.state,
            "plan": self.plan,
            "stats": self.stats,
            "findings": [f.to_dict() for f in self.findings],
        }


def _normalise(phases: Sequence[str]) -> list[str]:
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; known: {list(PHASES)}")
    wanted = set(phases)
    if "sweep" in wanted:
        wanted.add("mark")  # sweep deletes only outside a live set marked in the same run
    return [p for p in PHASES if p in wanted]


def run(
    ctx: Context,
    phases: Sequence[str] = PHASES,
    *,
    dry_run: bool = False,
    owner: str | None = None,
    check_objects: bool = True,
    hooks: CollectorHooks = NO_HOOKS,
) -> RunReport:
    """Workflow: one collector run (each phase opens its own short transactions).

    Raises ``LeaseHeld`` (another collector works: nothing recorded) or ``LeaseLost``."""
    names = _normalise(phases)
    handle = None if dry_run else lease.acquire(ctx.engine, ctx.clock, ttl_seconds=ctx.settings.gc_lease_seconds, owner=owner)
    try:
        if handle is not None:
            abandoned = lease.abandon_stale_runs(ctx.engine, ctx.clock, handle.owner)
            if abandoned:
                log.warning("gc: marked %d run(s) of dead collectors abandoned: %s", len(abandoned), abandoned)
                metrics.RUNS.labels(GcRunState.abandoned.value).inc(len(abandoned))
        hooks.after_lease()
        return _run_locked(ctx, names, dry_run=dry_run, handle=handle, check_objects=check_objects, hooks=hooks)
    finally:
        if handle is not None:
            try:
                handle.release()
            except Exception:  # noqa: BLE001 - it expires on its own
                pass


def _run_locked(
    ctx: Context, names: list[str], *, dry_run: bool, handle: lease.LeaseHandle | None, check_objects: bool, hooks: CollectorHooks
) -> RunReport:
    now = ctx.clock.now()
    t0 = time.perf_counter()
    rep = RunReport(new_id("gc"), names, dry_run)
    with session_scope(ctx.engine) as s:
        s.add(
            GcRun(
                id=rep.run_id,
                phases=",".join(names),
                dry_run=dry_run,
                state=GcRunState.running.value,
                started_at=now,
                owner=handle.owner if handle else None,
            )
        )
    c = Collection(ctx, rep.run_id, now, dry_run, handle, hooks=hooks)
    try:
        for name in names:
            res: PhaseResult
            if name == "expire":
                res = expire(c)
            elif name == "mark":
                res = mark(c, check_objects=check_objects)
            elif name == "sweep":
                res = sweep(c, rep.run_id)
            elif name == "invoices":
                res = close_invoices(c)
            elif name == "archives":
                res = prune_archives(c)
            else:
                res = orphans(c)
            rep.plan[name], rep.stats[name] = res.plan, res.stats
            rep.findings.extend(res.findings)
            if res.stop:
                rep.state = GcRunState.stopped
                log.error("gc run %s stopped after %s: %d findings", rep.run_id, name, len(res.findings))
                break
        else:
            rep.state = GcRunState.finished
    except LeaseLost:
        rep.state = GcRunState.aborted
        raise
    except Exception as exc:
        rep.state = GcRunState.aborted
        rep.findings.append(Finding("run_failed", type(exc).__name__, str(exc)))
        raise
    finally:
        rep.stats["duration_seconds"] = round(time.perf_counter() - t0, 3)
        _record(ctx, rep)
        _observe(rep)
    return rep


def _record(ctx: Context, rep: RunReport) -> None:
    try:
        with session_scope(ctx.engine) as s:
            row = s.get(GcRun, rep.run_id)
            if row is None:
                return
            row.state, row.finished_at = rep.state.value, ctx.clock.now()
            row.plan, row.stats = rep.plan, rep.stats
            row.findings = [f.to_dict() for f in rep.findings]
            s.add(row)
            keep = sa.select(col(GcRun.id)).order_by(col(GcRun.started_at).desc()).limit(KEEP_LIVE_SETS)
            s.execute(sa.delete(GcLiveBlob).where(col(GcLiveBlob.run_id).notin_(keep.scalar_subquery())))
    except Exception:  # noqa: BLE001 - never mask the run's own outcome
        log.exception("could not record gc run %s", rep.run_id)


def _observe(rep: RunReport) -> None:
    metrics.RUNS.labels(("dry_run_" if rep.dry_run else "") + rep.state).inc()
    metrics.DURATION.observe(float(rep.stats.get("duration_seconds", 0)))
    metrics.FINDINGS.set(len(rep.errors))
    if rep.dry_run:
        return
    ex = rep.stats.get("expire", {})
    metrics.EXPIRED.inc(ex.get("expired", 0) + ex.get("expired_by_policy", 0))
    sw = rep.stats.get("sweep", {})
    metrics.DELETED_BLOBS.inc(sw.get("deleted_objects", 0))
    metrics.DELETED_BYTES.inc(sw.get("deleted_bytes", 0))
    metrics.DELETE_FAILURES.inc(sw.get("delete_failures", 0))
    if rep.state == GcRunState.finished:
        metrics.LAST_SUCCESS.set_to_current_time()


@dataclass(frozen=True)
class LocalCollector:
    """The collector run in this process, as the API's ``CollectorPort`` (``weightstore serve``
    and the test server pass one to ``create_app``)."""

    hooks: CollectorHooks = NO_HOOKS

    @property
    def metrics(self) -> Sequence[MetricsCollector]:
        return metrics.ALL

    def run(self, ctx: Context, phases: Sequence[str], *, dry_run: bool) -> str:
        return run(ctx, phases, dry_run=dry_run, hooks=self.hooks).run_id

    def verify(self, ctx: Context, *, hash_sample: int) -> dict[str, Any]:
        from .verify import verify

        rep = verify(ctx, hash_sample=hash_sample)
        return {"clean": rep.clean, "stats": rep.stats, "findings": [f.to_dict() for f in rep.findings]}
