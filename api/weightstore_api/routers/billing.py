"""Billing API: current usage with a 720-hour projection, usage over a window, monthly invoices, CSV.

Admins read every tenant; any other key reads only its own tenant, and asking for another tenant is
answered 404 exactly as for a tenant that does not exist. "Every tenant" means every billed tenant:
operator tenants are left out of all-tenant answers and shown at $0, marked not billed, when asked for
by name (``weightstore.billing.billable``). Invoices are numbered, provisional for
the current month and frozen once closed (``weightstore.billing.invoices``); ``detail=checkpoint``
gives their checkpoint-level rows. Also serves the Tinker-shaped
``GET /api/v1/billing/usage/checkpoints/current`` and ``GET /api/v1/billing/usage/events``.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from sqlmodel import Session

from weightstore.auth import Principal
from weightstore.billing import catalog, events, invoices, usage
from weightstore.billing.pricing import Pricing, load_pricing
from weightstore.billing.units import DAY, FIRST_MONTH, GB, HOUR, LAST_MONTH, billing_window, round_cents
from weightstore.errors import InvalidRequest, NotFound
from weightstore.models import Tenant

from ..deps import CtxDep, CurrentPrincipal, SessionDep
from ..schemas import CurrentUsagePublic, UsagePublic
from .tinker_schemas import (
    BillingUsageEventPublic,
    BillingUsageResponsePublic,
    CheckpointBillingEventInfo,
    CurrentCheckpointStorageUsageItem,
    CurrentCheckpointStorageUsageResponse,
    StorageBillingEventInfo,
)

router = APIRouter(tags=["billing"])

Since = Annotated[
    datetime | None,
    Query(description="window start (UTC if no offset); cut at 1970-01-01. Default: 30 days before the end"),
]
Until = Annotated[datetime | None, Query(description="window end, exclusive (UTC if no offset); cut at now. Default: now")]
Month = Annotated[
    str,
    Path(
        pattern=r"^[0-9]{4}-[0-9]{2}$",
        description=f"calendar month (UTC), {FIRST_MONTH} .. {LAST_MONTH}",
        examples=["2026-01", FIRST_MONTH, LAST_MONTH],
    ),
]
GroupBy = Annotated[str, Query(description="comma-separated subset of tenant_id, run_id, kind", pattern=r"^[a-z_,]*$")]


def scope_tenant(session: Session, principal: Principal, tenant: str | None) -> str | None:
    """The tenant a request may read: ``None`` means all (admins only). Foreign → 404."""
    if tenant is None:
        return None if principal.is_admin else principal.tenant_id
    if not principal.is_admin and tenant != principal.tenant_id:
        raise NotFound(f"tenant {tenant} not found")
    if principal.is_admin and session.get(Tenant, tenant) is None:
        raise NotFound(f"tenant {tenant} not found")
    return tenant


def not_billed(prices: Pricing, tenant_id: str | None) -> list[str]:
    """The tenants in scope that are not billed: all operator tenants (left out of an all-tenant
    answer), or the one named if it is one (its usage shows, at $0)."""
    if tenant_id is None:
        return sorted(prices.unbilled)
    return [] if prices.billed(tenant_id) else [tenant_id]


def _groups(group_by: str) -> list[str]:
    return [g for g in group_by.split(",") if g]


def _csv(rows: list[dict[str, Any]], filename: str) -> Response:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return Response(buf.getvalue(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/v1/billing/current", operation_id="billing_current", response_model=CurrentUsagePublic)
def billing_current(
    principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep, tenant: str | None = None, group_by: GroupBy = "tenant_id"
) -> CurrentUsagePublic:
    """Checkpoints stored now per group (logical bytes) and the cost of keeping them 720 hours."""
    tid = scope_tenant(session, principal, tenant)
    now = ctx.clock.now()
    prices = load_pricing(session, ctx.settings)
    rows = usage.current(session, prices, now=now, group_by=_groups(group_by), tenant_id=tid)
    return CurrentUsagePublic(
        at=now,
        rows=[r.as_dict() for r in rows],
        total_logical_bytes=sum(r.logical_bytes for r in rows),
        total_projected_monthly_cost_usd=str(sum((r.monthly_cost_usd for r in rows), round_cents(0))),
        physical_bytes_by_tenant=catalog.physical_current(session, now=now, tenant_id=tid),
        not_billed_tenants=not_billed(prices, tid),
    )


@router.get(
    "/v1/billing/usage", operation_id="billing_usage", response_model=UsagePublic, responses={200: {"content": {"text/csv": {}}}}
)
def billing_usage(
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    tenant: str | None = None,
    since: Since = None,
    until: Until = None,
    group_by: GroupBy = "tenant_id",
    bucket: Literal["day", "hour", "none"] = "day",
    format: Literal["json", "csv"] = "json",
) -> Any:
    """Usage (byte-seconds, GB-hours) and cost in ``[since, until)`` per group and per UTC day/hour."""
    tid = scope_tenant(session, principal, tenant)
    start, end = billing_window(since, until, now=ctx.clock.now())
    seconds = {"day": DAY, "hour": HOUR, "none": None}[bucket]
    if seconds == HOUR and end - start > timedelta(days=62):
        raise InvalidRequest("hourly buckets cover at most 62 days")
    prices = load_pricing(session, ctx.settings)
    rows = usage.usage(
        session,
        prices,
        start=start,
        end=end,
        group_by=_groups(group_by),
        bucket_seconds=seconds,
        tenant_id=tid,
    )
    out = [r.as_dict() for r in rows]
    if format == "csv":
        return _csv(out, f"usage-{start.date()}-{end.date()}.csv")
    return UsagePublic(
        start=start,
        end=end,
        bucket=None if seconds is None else bucket,
        rows=out,
        total_byte_seconds=sum(r.byte_seconds for r in rows),
        total_cost_usd=str(sum((r.cost_usd for r in rows), round_cents(0))),
        not_billed_tenants=not_billed(prices, tid),
    )


@router.get(
    "/v1/billing/tenants/{tenant_id}/invoices/{month}",
    operation_id="billing_invoice",
    responses={200: {"content": {"text/csv": {}}}},
)
def billing_invoice(
    tenant_id: str,
    month: Month,
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    format: Literal["json", "csv"] = "json",
    detail: Annotated[
        Literal["line", "checkpoint"], Query(description="line: a row per (run, kind); checkpoint: a row per checkpoint")
    ] = "line",
) -> Any:
    """Invoice of one calendar month (UTC), numbered: a line per (run, kind) with its base model and
    checkpoint count, each rounded; total = sum of lines and adjustments. The current month is
    ``provisional`` (to date); an ended month is frozen the first time it is read."""
    tid = scope_tenant(session, principal, tenant_id)
    assert tid is not None
    inv = invoices.invoice(session, load_pricing(session, ctx.settings), tenant_id=tid, month=month, now=ctx.clock.now())
    if detail == "checkpoint":
        rows = inv.checkpoint_csv_rows()
        return _csv(rows, f"{inv.number}-checkpoints.csv") if format == "csv" else {**inv.as_dict(), "checkpoints": rows}
    if format == "csv":
        return invoice_csv(inv)
    return inv.as_dict()


@router.get(
    "/v1/billing/tenants/{tenant_id}/invoices/{month}/checkpoints.csv",
    operation_id="billing_invoice_checkpoints_csv",
    responses={200: {"content": {"text/csv": {}}}},
)
def billing_invoice_checkpoints(
    tenant_id: str, month: Month, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep
) -> Response:
    """The invoice's checkpoint-level CSV: a row per checkpoint stored in the month (as frozen, once closed)."""
    tid = scope_tenant(session, principal, tenant_id)
    assert tid is not None
    inv = invoices.invoice(session, load_pricing(session, ctx.settings), tenant_id=tid, month=month, now=ctx.clock.now())
    return checkpoints_csv(inv)


def checkpoints_csv(inv: invoices.Invoice) -> Response:
    return _csv(inv.checkpoint_csv_rows(), f"{inv.number}-checkpoints.csv")


def invoice_csv(inv: invoices.Invoice) -> Response:
    rows = inv.csv_rows()
    if rows:
        rows.append(
            {
                **{k: "" for k in rows[0]},
                "number": inv.number,
                "tenant_id": inv.tenant_id,
                "month": inv.month,
                "status": inv.status,
                "line": "total",
                "run_id": "TOTAL",
                "checkpoint_count": inv.checkpoint_count,
                "byte_seconds": inv.byte_seconds,
                "amount_usd": str(inv.total_usd),
            }
        )
    return _csv(rows, f"{inv.number}.csv")


# --- Tinker shape -------------------------------------------------------------------------------


@router.get(
    "/api/v1/billing/usage/checkpoints/current",
    operation_id="tinker_current_checkpoint_storage_usage",
    response_model=CurrentCheckpointStorageUsageResponse,
    tags=["tinker"],
)
def tinker_current_usage(principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> CurrentCheckpointStorageUsageResponse:
    """One item per tenant (every billed tenant for an admin key, the caller's own otherwise); gross
    720-hour projection (zero for an operator tenant: not billed)."""
    tid = scope_tenant(session, principal, None)
    prices = load_pricing(session, ctx.settings)
    rows = usage.current(session, prices, now=ctx.clock.now(), group_by=("tenant_id",), tenant_id=tid)
    data = [
        CurrentCheckpointStorageUsageItem(
            project_id=r.key["tenant_id"],
            user_name=r.key["tenant_id"],
            checkpoint_count=r.checkpoint_count,
            size_bytes=r.logical_bytes,
            size_gigabytes=r.logical_bytes / GB,
            estimated_monthly_cost_usd=float(r.monthly_cost_usd),
        )
        for r in rows
    ]
    total_bytes = sum(r.logical_bytes for r in rows)
    # the blended rate of what is stored; with nothing stored, the tenant's list price
    rate = float(sum(r.monthly_cost_exact_usd for r in rows) / total_bytes * GB) if total_bytes else float(prices.rate(tid, None))
    return CurrentCheckpointStorageUsageResponse(effective_rate_usd_per_gigabyte_month=round(rate, 6), data=data)


@router.get(
    "/api/v1/billing/usage/events",
    operation_id="tinker_billing_usage_events",
    response_model=BillingUsageResponsePublic,
    tags=["tinker"],
)
def tinker_billing_usage_events(
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    starting_on: Annotated[datetime, Query(description="inclusive, aligned to a UTC hour, not in the future")],
    ending_before: Annotated[datetime, Query(description="exclusive, aligned to a UTC hour, at most 14 days later; cut at now")],
) -> BillingUsageResponsePublic:
    """Hourly usage events (``tinker billing usage``): per (hour, tenant, base model) the GB-hours
    stored (``storage``) and the checkpoints committed (``checkpoint``). All tenants for an admin key,
    the caller's own otherwise; ``project_id`` and ``user_name`` are the tenant. All tenants means every
    billed tenant; an operator tenant's own events are ``free`` at $0 (``weightstore.billing.billable``)."""
    tid = scope_tenant(session, principal, None)
    start, end = events.event_window(starting_on, ending_before, now=ctx.clock.now())
    prices = load_pricing(session, ctx.settings)
    found = events.billing_events(session, prices, start=start, end=end, tenant_id=tid)
    data = [
        BillingUsageEventPublic(
            bucket_start=e.bucket_start,
            bucket_end=e.bucket_end,
            base_model=e.base_model,
            user_name=e.tenant_id,
            project_id=e.tenant_id,
            estimated_cost_usd=e.estimated_cost_usd if e.type == "storage" else None,
            effective_rate_usd_per_gigabyte_month=e.rate_usd_per_gb_month if e.type == "storage" else None,
            event_info=StorageBillingEventInfo(gigabyte_hours=e.gigabyte_hours, free=not prices.billed(e.tenant_id))
            if e.type == "storage"
            else CheckpointBillingEventInfo(count=e.count),
        )
        for e in found
    ]
    return BillingUsageResponsePublic(data=data)
