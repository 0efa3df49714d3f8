"""Native API for retention policies and pins (``weightstore.policies``).

``/v1/runs/{run_id}/retention`` is the run's policy (a trainer of the run's tenant sets it; GET
answers the policy in effect, the run's own or its tenant default); ``/v1/tenants/{tenant}/retention``
is a tenant default (an admin, or a trainer of that tenant); ``/v1/retention`` lists the caller's
policies; ``.../pin`` and ``.../unpin`` on a checkpoint. The collector's expire phase applies them.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from weightstore import policies
from weightstore.names import TinkerPath

from ..convert import checkpoint_public, retention_public
from ..deps import CtxDep, CurrentPrincipal, SessionDep, WriterPrincipal
from ..errors import request_id_of
from ..schemas import CheckpointPublic, RetentionPoliciesPublic, RetentionPolicyPublic, RetentionPolicyUpdate, UnpinUpdate

router = APIRouter(prefix="/v1", tags=["retention"])


@router.get("/retention", operation_id="list_retention_policies", response_model=RetentionPoliciesPublic)
def list_retention_policies(principal: CurrentPrincipal, session: SessionDep) -> RetentionPoliciesPublic:
    """The caller's tenant's policies (an admin: every tenant's), tenant defaults first."""
    rows = policies.list_policies(session, principal)
    return RetentionPoliciesPublic(policies=[p for p in map(retention_public, rows) if p is not None])


@router.get("/runs/{run_id}/retention", operation_id="get_run_retention", response_model=RetentionPolicyPublic | None)
def get_run_retention(run_id: str, principal: CurrentPrincipal, session: SessionDep) -> RetentionPolicyPublic | None:
    """The policy in effect for the run: its own, else its tenant's default, else ``null``."""
    return retention_public(policies.run_policy(session, principal, run_id))


@router.put("/runs/{run_id}/retention", operation_id="set_run_retention", response_model=RetentionPolicyPublic)
def set_run_retention(
    run_id: str, body: RetentionPolicyUpdate, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> RetentionPolicyPublic | None:
    """The run's own policy; it replaces the tenant default for this run (no rule at all: keep all)."""
    policy = policies.set_run_policy(
        session,
        principal,
        run_id,
        keep_last=body.keep_last,
        keep_every=body.keep_every,
        now=ctx.clock.now(),
        request_id=request_id_of(request),
    )
    return retention_public(policy)


@router.delete("/runs/{run_id}/retention", operation_id="clear_run_retention", response_model=RetentionPolicyPublic | None)
def clear_run_retention(
    run_id: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> RetentionPolicyPublic | None:
    """Remove the run's own policy; answers what applies now (the tenant default or ``null``)."""
    policy = policies.clear_run_policy(session, principal, run_id, now=ctx.clock.now(), request_id=request_id_of(request))
    return retention_public(policy)


@router.get("/tenants/{tenant}/retention", operation_id="get_tenant_retention", response_model=RetentionPolicyPublic | None)
def get_tenant_retention(tenant: str, principal: CurrentPrincipal, session: SessionDep) -> RetentionPolicyPublic | None:
    return retention_public(policies.tenant_policy(session, principal, tenant))


@router.put("/tenants/{tenant}/retention", operation_id="set_tenant_retention", response_model=RetentionPolicyPublic)
def set_tenant_retention(
    tenant: str, body: RetentionPolicyUpdate, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> RetentionPolicyPublic | None:
    """The tenant default (an admin for any tenant, a trainer for its own)."""
    policy = policies.set_tenant_policy(
        session,
        principal,
        tenant,
        keep_last=body.keep_last,
        keep_every=body.keep_every,
        now=ctx.clock.now(),
        request_id=request_id_of(request),
    )
    return retention_public(policy)


@router.delete("/tenants/{tenant}/retention", operation_id="clear_tenant_retention", status_code=204)
def clear_tenant_retention(tenant: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request) -> None:
    policies.clear_tenant_policy(session, principal, tenant, now=ctx.clock.now(), request_id=request_id_of(request))


@router.post("/checkpoints/{run_id}/{segment}/{name}/pin", operation_id="pin_checkpoint", response_model=CheckpointPublic)
def pin_checkpoint(
    run_id: str, segment: str, name: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> CheckpointPublic:
    """Never expire it by policy or TTL (its TTL is cleared)."""
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    ckpt = policies.pin(session, principal, path, now=ctx.clock.now(), request_id=request_id_of(request))
    return checkpoint_public(ckpt, session)


@router.post("/checkpoints/{run_id}/{segment}/{name}/unpin", operation_id="unpin_checkpoint", response_model=CheckpointPublic)
def unpin_checkpoint(
    run_id: str,
    segment: str,
    name: str,
    principal: WriterPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    request: Request,
    body: UnpinUpdate | None = None,
) -> CheckpointPublic:
    """Eligible for policy expiry again; for TTL expiry too when ``ttl_seconds`` is given."""
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    ckpt = policies.unpin(
        session,
        principal,
        path,
        settings=ctx.settings,
        now=ctx.clock.now(),
        ttl_seconds=body.ttl_seconds if body is not None else None,
        request_id=request_id_of(request),
    )
    return checkpoint_public(ckpt, session)
