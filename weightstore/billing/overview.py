"""The admin overview: every tenant's current usage and its daily usage up to now, from one statement."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from weightstore.billing.aggregates import day_sums, window_sums
from weightstore.billing.pricing import Pricing
from weightstore.billing.units import DAY, epoch
from weightstore.billing.usage import CurrentRow, UsageRow, check_window, current_rows, usage_rows


@dataclass(frozen=True)
class Overview:
    """All tenants at ``now``: what the admin overview page shows, from ONE pass over the intervals."""

    current: list[CurrentRow]
    """Per tenant, as ``current(now=now)`` returns it."""
    daily: list[UsageRow]
    """Per tenant and bucket in ``[start, now)``, as ``usage(start, now, bucket_seconds)`` returns it."""


def overview(session: Session, pricing: Pricing, *, now: datetime, start: datetime, bucket_seconds: int = DAY) -> Overview:
    """``current(now)`` and ``usage(start, now, bucket_seconds)`` of all billed tenants in one query
    (operator tenants are not billed: the aggregates leave them out, ``weightstore.billing.billable``).

    The intervals overlapping ``[start, now)`` are read once; the ones still stored at ``now`` are
    exactly those among them with ``stop_s > now``, so the same statement also counts them."""
    ws, we = epoch(start), epoch(now)
    check_window(ws, we, bucket_seconds)
    fine = ["tenant_id", "kind"]
    if bucket_seconds == DAY:  # whole days from usage_day: O(tenants x kinds x days) rows (§4)
        acc, cur = day_sums(session, ws=ws, we=we, tenant_id=None)
    else:
        acc, cur = window_sums(session, fine, ws=ws, we=we, bucket_seconds=bucket_seconds, tenant_id=None, current_at_end=True)
    return Overview(
        current=current_rows(pricing, cur, fine, ["tenant_id"]),
        daily=usage_rows(pricing, acc, fine, ["tenant_id"], bucket_seconds),
    )
