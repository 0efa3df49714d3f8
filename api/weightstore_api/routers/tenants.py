"""Tenant administration API (admin keys only): create, list, show, change, disable/enable, delete.

The rules (ids vs names, the operator tenant, what delete does, the quota) live in
``weightstore.tenants``; routes only translate bodies. ``{name}`` accepts a tenant's id or name.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from sqlmodel import Session

from weightstore import tenants
from weightstore.errors import InvalidRequest
from weightstore.models import Tenant, TenantState

from ..deps import AdminPrincipal, CtxDep, SessionDep
from ..schemas import TenantCreate, TenantDeleted, TenantPublic, TenantsPublic, TenantUpdate

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


def tenant_public(t: Tenant, usage: tenants.TenantUsage) -> TenantPublic:
    return TenantPublic(
        tenant_id=t.id,
        name=t.name,
        state=t.state,
        operator=t.operator,
        created_at=t.created_at,
        price_per_gb_month_usd=t.price_per_gb_month_usd,
        quota_bytes=t.quota_bytes,
        soft_quota_bytes=t.soft_quota_bytes,
        used_bytes=usage.used_bytes,
        stored_bytes=usage.stored_bytes,
        reserved_bytes=usage.reserved_bytes,
        default_ttl_training_seconds=t.default_ttl_training_seconds,
        default_ttl_sampler_seconds=t.default_ttl_sampler_seconds,
    )


def _public(session: Session, t: Tenant, now: datetime) -> TenantPublic:
    return tenant_public(t, tenants.usage(session, t.id, now=now))


@router.post("", operation_id="create_tenant", status_code=201, response_model=TenantPublic)
def create_tenant(body: TenantCreate, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> TenantPublic:
    now = ctx.clock.now()
    t = tenants.create(
        session,
        body.name,
        now=now,
        principal=principal,
        price_per_gb_month_usd=body.price_per_gb_month_usd,
        quota_bytes=body.quota_bytes,
        soft_quota_bytes=body.soft_quota_bytes,
    )
    return _public(session, t, now)


@router.get("", operation_id="list_tenants", response_model=TenantsPublic)
def list_tenants(principal: AdminPrincipal, ctx: CtxDep, session: SessionDep, include_deleted: bool = True) -> TenantsPublic:
    now = ctx.clock.now()
    used = tenants.usage_all(session, now=now)
    rows = tenants.list_tenants(session, include_deleted=include_deleted)
    return TenantsPublic(tenants=[tenant_public(t, used.get(t.id, tenants.TenantUsage(0, 0))) for t in rows])


@router.get("/{name}", operation_id="get_tenant", response_model=TenantPublic)
def get_tenant(name: str, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> TenantPublic:
    return _public(session, tenants.get(session, name), ctx.clock.now())


@router.patch("/{name}", operation_id="update_tenant", response_model=TenantPublic)
def update_tenant(name: str, body: TenantUpdate, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> TenantPublic:
    """Change the fields present in the body; an explicit null clears a price override or a quota."""
    sent = body.model_fields_set
    if "name" in sent and body.name is None:
        raise InvalidRequest("name cannot be null (a tenant always has a name)")
    now = ctx.clock.now()
    t = tenants.update(
        session,
        name,
        now=now,
        principal=principal,
        name=body.name if body.name is not None else tenants.UNSET,
        price_per_gb_month_usd=body.price_per_gb_month_usd if "price_per_gb_month_usd" in sent else tenants.UNSET,
        quota_bytes=body.quota_bytes if "quota_bytes" in sent else tenants.UNSET,
        soft_quota_bytes=body.soft_quota_bytes if "soft_quota_bytes" in sent else tenants.UNSET,
    )
    return _public(session, t, now)


@router.post("/{name}/disable", operation_id="disable_tenant", response_model=TenantPublic)
def disable_tenant(name: str, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> TenantPublic:
    """Refuse every key of the tenant (403 ``tenant_disabled``) until it is enabled; nothing is deleted."""
    now = ctx.clock.now()
    return _public(session, tenants.set_state(session, name, TenantState.disabled, now=now, principal=principal), now)


@router.post("/{name}/enable", operation_id="enable_tenant", response_model=TenantPublic)
def enable_tenant(name: str, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> TenantPublic:
    now = ctx.clock.now()
    return _public(session, tenants.set_state(session, name, TenantState.active, now=now, principal=principal), now)


@router.delete("/{name}", operation_id="delete_tenant", response_model=TenantDeleted)
def delete_tenant(name: str, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> TenantDeleted:
    """Delete the tenant's checkpoints (billed up to now; bytes reclaimed by the collector), abort its
    uploads, cancel its exports, revoke its keys; the tenant stays listed as ``deleted`` so its past
    invoices remain readable."""
    now = ctx.clock.now()
    res = tenants.delete(session, name, now=now, principal=principal)
    return TenantDeleted(
        **_public(session, res.tenant, now).model_dump(),
        checkpoints_deleted=res.checkpoints_deleted,
        keys_revoked=res.keys_revoked,
        uploads_aborted=res.uploads_aborted,
        exports_cancelled=res.exports_cancelled,
    )
