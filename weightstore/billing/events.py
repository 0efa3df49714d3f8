"""Hourly billing events (the Tinker ``GET /api/v1/billing/usage/events`` shape, before the wire).

Two event types, one row per (UTC hour, tenant, base model):

* ``storage``: GB-hours stored in that hour (exact byte-seconds from the ledger, ``usage.usage`` with
  hourly buckets grouped by run, then merged by the run's base model) and its estimated cost, whose
  effective rate is exactly ``cost / (GB-hours / 720)``;
* ``checkpoint``: how many checkpoints were committed in that hour (starts of ``usage_interval``).

The window must be hour-aligned, start before now and span at most ``MAX_EVENT_WINDOW_HOURS`` (the
Tinker contract); its end is cut at now (never bill the future, docs/design-billing.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.billing.billable import billed_only_sql
from weightstore.billing.pricing import Pricing
from weightstore.billing.units import BILLING_EPOCH, BYTE_SECONDS_PER_GB_MONTH, GB, HOUR, epoch, from_epoch, utc
from weightstore.billing.usage import parse_bucket_label, usage
from weightstore.errors import InvalidRequest
from weightstore.models import TrainingRun

MAX_EVENT_WINDOW_HOURS = 14 * 24
"""The Tinker contract: ``ending_before`` at most 14 days after ``starting_on``."""
UNKNOWN_BASE_MODEL: str | None = None
"""A run whose row is gone has no base model (the Tinker field is then null)."""


@dataclass(frozen=True)
class BillingEvent:
    """One hour of one tenant's usage for one base model."""

    bucket_start: datetime
    tenant_id: str
    base_model: str | None
    type: str
    """``storage`` or ``checkpoint``."""
    byte_seconds: int = 0
    cost_exact_usd: Fraction = Fraction(0)
    count: int = 0
    """Checkpoints committed in the hour (``checkpoint`` events)."""

    @property
    def bucket_end(self) -> datetime:
        return self.bucket_start + timedelta(hours=1)

    @property
    def gigabyte_hours(self) -> float:
        return float(Decimal(self.byte_seconds) / (GB * 3600))

    @property
    def estimated_cost_usd(self) -> float:
        return float(self.cost_exact_usd)

    @property
    def rate_usd_per_gb_month(self) -> float | None:
        """Cost per GB-month of this row (None if nothing was stored)."""
        if not self.byte_seconds:
            return None
        return float(self.cost_exact_usd / Fraction(self.byte_seconds, BYTE_SECONDS_PER_GB_MONTH))


def event_window(starting_on: datetime, ending_before: datetime, *, now: datetime) -> tuple[datetime, datetime]:
    """The Tinker window rules; the end is cut at now. Each refusal is an ``InvalidRequest``."""
    start, end = utc(starting_on), utc(ending_before)
    for name, t in (("starting_on", start), ("ending_before", end)):
        if epoch(t) % HOUR or t.microsecond:
            raise InvalidRequest(f"{name} must be aligned to a UTC hour boundary, got {t.isoformat()}")
    if end <= start:
        raise InvalidRequest("ending_before must be after starting_on")
    if end - start > timedelta(hours=MAX_EVENT_WINDOW_HOURS):
        raise InvalidRequest("ending_before may be at most 14 days after starting_on")
    if start >= now:
        raise InvalidRequest(f"starting_on must not be in the future (now is {now.isoformat()})")
    return max(start, BILLING_EPOCH), max(min(end, now), BILLING_EPOCH)  # nothing is stored before the epoch


def billing_events(
    session: Session, pricing: Pricing, *, start: datetime, end: datetime, tenant_id: str | None
) -> list[BillingEvent]:
    """Storage and checkpoint events per (hour, tenant, base model) in ``[start, end)``, ordered by
    hour, then type (storage first), tenant and base model."""
    if end <= start:
        return []
    rows = usage(
        session, pricing, start=start, end=end, group_by=("tenant_id", "run_id"), bucket_seconds=HOUR, tenant_id=tenant_id
    )
    ws, we = epoch(start), epoch(end)
    params: dict[str, object] = {"ws": ws, "we": we}
    where = "start_s >= :ws AND start_s < :we"
    if tenant_id is not None:
        where += " AND tenant_id = :t"
        params["t"] = tenant_id
    else:  # every billed tenant, like ``usage`` above (weightstore.billing.billable)
        where += billed_only_sql(params)
    commits = session.execute(
        sa.text(
            f"SELECT tenant_id, run_id, start_s / {HOUR} AS h, COUNT(*) FROM usage_interval WHERE {where} "
            "GROUP BY tenant_id, run_id, start_s / 3600"
        ),
        params,
    ).all()
    run_ids = {r.key["run_id"] for r in rows} | {c[1] for c in commits}
    base: dict[str, str] = {}
    if run_ids:
        found = session.exec(select(TrainingRun.id, TrainingRun.base_model).where(col(TrainingRun.id).in_(sorted(run_ids))))
        base = dict(found.all())

    Key = tuple[datetime, str, str | None]
    stored: dict[Key, int] = {}
    costs: dict[Key, Fraction] = {}
    for r in rows:
        if r.byte_seconds <= 0:
            continue
        key = (parse_bucket_label(r.key["bucket"]), r.key["tenant_id"], base.get(r.key["run_id"], UNKNOWN_BASE_MODEL))
        stored[key] = stored.get(key, 0) + r.byte_seconds
        costs[key] = costs.get(key, Fraction(0)) + r.cost_exact_usd
    counts: dict[Key, int] = {}
    for tid, run_id, hour, n in commits:
        key = (from_epoch(int(hour) * HOUR), tid, base.get(run_id, UNKNOWN_BASE_MODEL))
        counts[key] = counts.get(key, 0) + int(n)

    events = [
        BillingEvent(bucket_start=b, tenant_id=t, base_model=m, type="storage", byte_seconds=bs, cost_exact_usd=costs[(b, t, m)])
        for (b, t, m), bs in stored.items()
    ]
    events += [
        BillingEvent(bucket_start=b, tenant_id=t, base_model=m, type="checkpoint", count=n) for (b, t, m), n in counts.items()
    ]
    order = {"storage": 0, "checkpoint": 1}
    events.sort(key=lambda e: (e.bucket_start, order[e.type], e.tenant_id, e.base_model or ""))
    return events
