"""Admin endpoints of the collector: list/get/trigger runs, restore an expired checkpoint, and set
a tenant's default TTL. The collector's Prometheus metrics join the app's ``/metrics``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from weightstore.errors import NotFound
from weightstore_gc import restore_checkpoint, runner
from weightstore_gc.metrics import ALL as GC_METRICS
from weightstore_gc.tenant_ttl import set_default_ttl

from ..convert import checkpoint_public
from ..deps import AdminPrincipal, CtxDep, Offset, SessionDep
from ..errors import request_id_of
from ..observability import REGISTRY
from ..schemas import CheckpointPublic

router = APIRouter(prefix="/v1/admin", tags=["gc"])
Phase = Literal["expire", "mark", "sweep", "orphans"]


class GcRunPublic(BaseModel):
    id: str
    phases: list[str]
    dry_run: bool
    state: str
    started_at: datetime
    finished_at: datetime | None
    owner: str | None
    plan: dict[str, Any] | None
    stats: dict[str, Any] | None
    findings: list[dict[str, Any]] | None


class GcRunsPublic(BaseModel):
    runs: list[GcRunPublic]


class GcRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phases: list[Phase] = Field(default_factory=lambda: ["expire", "mark", "sweep", "orphans"])
    dry_run: bool = False


class RestoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_seconds: int | None = None


class DefaultTTLUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    training_seconds: int | None = Field(None, description="Seconds; 0 removes the default; absent leaves it.")
    sampler_seconds: int | None = None


class DefaultTTLPublic(BaseModel):
    tenant: str
    training_seconds: int | None
    sampler_seconds: int | None


def _public(row: Any) -> GcRunPublic:
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
    _: AdminPrincipal, ctx: CtxDep, limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Offset = 0
) -> GcRunsPublic:
    return GcRunsPublic(runs=[_public(r) for r in runner.list_runs(ctx, limit=limit, offset=offset)])


@router.get("/gc/runs/{run_id}", operation_id="get_gc_run", response_model=GcRunPublic)
def get_gc_run(run_id: str, _: AdminPrincipal, ctx: CtxDep) -> GcRunPublic:
    row = runner.get_run(ctx, run_id)
    if row is None:
        raise NotFound(f"gc run {run_id} not found")
    return _public(row)


@router.post("/gc/runs", operation_id="create_gc_run", status_code=201, response_model=GcRunPublic)
async def create_gc_run(body: GcRunCreate, _: AdminPrincipal, ctx: CtxDep) -> GcRunPublic:
    """Run the collector now (synchronously). 423 ``lease_held`` if another collector is working."""
    rep = await run_in_threadpool(runner.run, ctx, list(body.phases), dry_run=body.dry_run)
    row = runner.get_run(ctx, rep.run_id)
    assert row is not None
    return _public(row)


@router.post("/checkpoints/{checkpoint_id}/restore", operation_id="restore_checkpoint", response_model=CheckpointPublic)
def restore(
    checkpoint_id: str, body: RestoreCreate, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> CheckpointPublic:
    """Undo an expiry (until the collector releases the checkpoint, one grace period after it expired)."""
    ckpt = restore_checkpoint(
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
    t = set_default_ttl(session, tenant, settings=ctx.settings, training=body.training_seconds, sampler=body.sampler_seconds)
    return DefaultTTLPublic(
        tenant=t.name, training_seconds=t.default_ttl_training_seconds, sampler_seconds=t.default_ttl_sampler_seconds
    )


def install(app: FastAPI) -> None:
    for metric in GC_METRICS:
        try:
            REGISTRY.register(metric)
        except ValueError:  # already registered by an earlier app in this process (tests)
            pass
