"""Admin endpoints of the collector and retention: runs, restore, tenant default TTLs.

List, read and trigger collector runs; verify the store and read the lease (``gc/verify``,
``gc/status``: what ``weightstore gc verify|status`` call by default); restore an expired checkpoint; set a tenant's default TTL.

Runs are triggered through the ``CollectorPort`` the app was built with (``create_app(...,
collector=...)``); this module never imports the collector package. Without one, triggering a run
answers 400 ``unsupported``; reading recorded runs, restore and default TTLs need only the core.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy.engine import make_url
from sqlmodel import Session

from weightstore import collector, retention
from weightstore.clock import as_utc
from weightstore.collector import CollectorPort
from weightstore.context import Context
from weightstore.errors import NotFound, Unsupported
from weightstore.models import GcRun, Lease

from ..convert import checkpoint_public
from ..deps import AdminPrincipal, CtxDep, Offset, SessionDep
from ..errors import request_id_of
from ..observability import REGISTRY
from ..schemas import (
    CheckpointPublic,
    DefaultTTLPublic,
    DefaultTTLUpdate,
    GcCheckedPublic,
    GcLeasePublic,
    GcRunCreate,
    GcRunPublic,
    GcRunsPublic,
    GcStatusPublic,
    GcVerifyPublic,
    RestoreCreate,
)

router = APIRouter(prefix="/v1/admin", tags=["gc"])
GC_LEASE_NAME = "gc"
"""The collector's lease row (``weightstore_gc.lease.GC_LEASE``; the API reads it, never takes it)."""


def _public(row: GcRun) -> GcRunPublic:
    return GcRunPublic(
        id=row.id,
        phases=row.phases.split(","),
        dry_run=row.dry_run,
        state=row.state,
        started_at=row.started_at,
        finished_at=row.finished_at,
        owner=row.owner,
        plan=row.plan,
        stats=row.stats,
        findings=row.findings,
    )


@router.get("/gc/runs", operation_id="list_gc_runs", response_model=GcRunsPublic)
def list_gc_runs(
    _: AdminPrincipal, session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Offset = 0
) -> GcRunsPublic:
    return GcRunsPublic(runs=[_public(r) for r in collector.list_runs(session, limit=limit, offset=offset)])


def _recorded_run(session: Session, run_id: str) -> GcRun:
    row = collector.get_run(session, run_id)
    if row is None:
        raise NotFound(f"gc run {run_id} not found")
    return row


@router.get("/gc/runs/{run_id}", operation_id="get_gc_run", response_model=GcRunPublic)
def get_gc_run(run_id: str, _: AdminPrincipal, session: SessionDep) -> GcRunPublic:
    return _public(_recorded_run(session, run_id))


def _collector_of(request: Request) -> CollectorPort:
    port: CollectorPort | None = request.app.state.collector
    if port is None:
        raise Unsupported("this server runs no collector; run `weightstore gc run --direct` where the collector is installed")
    return port


@router.post("/gc/runs", operation_id="create_gc_run", status_code=201, response_model=GcRunPublic)
def create_gc_run(body: GcRunCreate, _: AdminPrincipal, ctx: CtxDep, session: SessionDep, request: Request) -> GcRunPublic:
    """Run the collector now (synchronously, on a worker thread). 423 ``lease_held`` if another
    collector is working; 400 ``unsupported`` if this server was started without one.

    Workflow: the collector commits its own short transactions; ``session`` is first used after
    the run, to read the row it recorded."""
    run_id = _collector_of(request).run(ctx, list(body.phases), dry_run=body.dry_run)
    return _public(_recorded_run(session, run_id))


@router.post("/gc/verify", operation_id="verify_store", response_model=GcVerifyPublic)
def verify_store(
    _: AdminPrincipal, ctx: CtxDep, request: Request, hash_sample: Annotated[int, Query(ge=0, le=10_000)] = 0
) -> GcVerifyPublic:
    """Check every storage invariant of this server's catalog and store (changes nothing): the
    report names what it checked. 400 ``unsupported`` if this server was started without a collector.

    Workflow: the collector opens its own short read transactions between object-store listings."""
    report = _collector_of(request).verify(ctx, hash_sample=hash_sample)
    return GcVerifyPublic(
        checked=_checked(ctx),
        clean=bool(report["clean"]),
        stats=dict(report["stats"]),
        findings=list(report["findings"]),
    )


@router.get("/gc/status", operation_id="gc_status", response_model=GcStatusPublic)
def gc_status(
    _: AdminPrincipal, ctx: CtxDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 10
) -> GcStatusPublic:
    """The collector lease (who holds it, until when) and the last recorded runs."""
    held = session.get(Lease, GC_LEASE_NAME)
    now = ctx.clock.now()
    lease = (
        None
        if held is None
        else GcLeasePublic(
            owner=held.owner,
            token=held.token,
            heartbeat_at=held.heartbeat_at,
            expires_at=held.expires_at,
            active=as_utc(held.expires_at) > now,
        )
    )
    runs = [_public(r) for r in collector.list_runs(session, limit=limit)]
    return GcStatusPublic(checked=_checked(ctx), lease=lease, runs=runs)


def _checked(ctx: Context) -> GcCheckedPublic:
    """What a report is about: this server's catalog (URL without credentials) and bucket."""
    return GcCheckedPublic(
        catalog=make_url(ctx.settings.resolved_database_url).render_as_string(hide_password=True),
        store=ctx.settings.s3_endpoint_url or "",
        bucket=ctx.settings.s3_bucket,
    )


@router.post("/checkpoints/{checkpoint_id}/restore", operation_id="restore_checkpoint", response_model=CheckpointPublic)
def restore(
    checkpoint_id: str, body: RestoreCreate, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> CheckpointPublic:
    """Undo an expiry (until the collector releases the checkpoint, one grace period after it expired)."""
    ckpt = retention.restore_checkpoint(
        session,
        principal,
        checkpoint_id,
        settings=ctx.settings,
        now=ctx.clock.now(),
        ttl_seconds=body.ttl_seconds,
        request_id=request_id_of(request),
    )
    return checkpoint_public(ckpt)


@router.put("/tenants/{tenant}/default-ttl", operation_id="set_tenant_default_ttl", response_model=DefaultTTLPublic)
def put_default_ttl(tenant: str, body: DefaultTTLUpdate, _: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> DefaultTTLPublic:
    t = retention.set_default_ttl(
        session, tenant, settings=ctx.settings, training=body.training_seconds, sampler=body.sampler_seconds
    )
    return DefaultTTLPublic(
        tenant=t.name, training_seconds=t.default_ttl_training_seconds, sampler_seconds=t.default_ttl_sampler_seconds
    )


def register_metrics(port: CollectorPort) -> None:
    """Add the collector's metrics to the app's ``/metrics`` registry (once per process)."""
    for metric in port.metrics:
        try:
            REGISTRY.register(metric)
        except ValueError:  # already registered by an earlier app in this process (tests)
            pass
