"""Usage and cost per group: over a window (optionally per day or hour bucket) and at an instant.

A pure function of the ledger (through the derived tables, ``weightstore.billing.aggregates``) and
the prices. Cost depends on (tenant, kind), so the SQL always groups by both ("fine" rows); rows are
merged to the requested grouping here, summing exact costs, which is O(result rows), not
O(checkpoints). Money follows the rule in ``weightstore.billing.units``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from sqlmodel import Session

from weightstore.billing.aggregates import ByteSeconds, Stored, day_sums, stored_at, window_sums
from weightstore.billing.pricing import Pricing, RateCache
from weightstore.billing.units import DAY, GB, SECONDS_PER_MONTH, epoch, from_epoch, round_cents
from weightstore.errors import InvalidRequest

GROUPS = ("tenant_id", "run_id", "kind")
"""Columns usage can be grouped by (any subset); buckets (day/hour) come on top."""
MAX_BUCKETS = 24 * 400
"""At most this many buckets per request (400 days of hours): bounds the rows a chart asks for."""


def check_groups(group_by: Sequence[str]) -> list[str]:
    """The requested grouping columns, deduplicated; unknown ones are an ``InvalidRequest``."""
    cols = list(dict.fromkeys(group_by))
    bad = [g for g in cols if g not in GROUPS]
    if bad:
        raise InvalidRequest(f"cannot group by {bad}; choose from {list(GROUPS)}")
    return cols


def fine_groups(cols: Sequence[str]) -> list[str]:
    """SQL grouping columns: the requested ones plus (tenant, kind) that the price depends on, in the
    order of the ``ix_usage_interval_cover`` index, so a tenant's rows aggregate as they are read."""
    return [c for c in ("tenant_id", "kind", "run_id") if c in cols or c in ("tenant_id", "kind")]


def check_window(ws: int, we: int, bucket_seconds: int | None) -> None:
    """A window must end after it starts and hold at most ``MAX_BUCKETS`` buckets."""
    if we <= ws:
        raise InvalidRequest("the window must end after it starts")
    if bucket_seconds is not None and (we - ws) // bucket_seconds > MAX_BUCKETS:
        raise InvalidRequest("too many buckets for this window")


# --- usage over a window ------------------------------------------------------------------------
@dataclass(frozen=True)
class UsageRow:
    """Usage of one group (and bucket) in a window; ``cost_usd`` exact, ``cost_rounded_usd`` per the rule."""

    key: dict[str, Any]
    """The group's columns (and ``bucket``: its label) and their values."""
    byte_seconds: int
    cost_exact_usd: Fraction

    @property
    def gb_hours(self) -> Decimal:
        return Decimal(self.byte_seconds) / (GB * 3600)

    @property
    def cost_usd(self) -> Decimal:
        return round_cents(self.cost_exact_usd)

    @property
    def average_bytes(self) -> Decimal:
        return Decimal(self.byte_seconds)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.key)
        out.update(byte_seconds=self.byte_seconds, gb_hours=float(round(self.gb_hours, 6)), cost_usd=str(self.cost_usd))
        return out


def bucket_label(b: int, bucket_seconds: int) -> str:
    """A bucket's label: its UTC date for days, its ISO instant otherwise."""
    dt = from_epoch(b * bucket_seconds)
    return dt.date().isoformat() if bucket_seconds == DAY else dt.isoformat()


def parse_bucket_label(label: str) -> datetime:
    """The start of the bucket ``bucket_label`` named."""
    if len(label) == 10:
        d = date.fromisoformat(label)
        return datetime(d.year, d.month, d.day, tzinfo=UTC)
    return datetime.fromisoformat(label)


def usage(
    session: Session,
    pricing: Pricing,
    *,
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = ("tenant_id",),
    bucket_seconds: int | None = None,
    tenant_id: str | None = None,
) -> list[UsageRow]:
    """Usage and exact cost in ``[start, end)`` per group (and per UTC bucket if ``bucket_seconds``)."""
    cols = check_groups(group_by)
    ws, we = epoch(start), epoch(end)
    check_window(ws, we, bucket_seconds)
    fine = fine_groups(cols)
    if "run_id" not in fine and bucket_seconds in (None, DAY):
        # per (tenant, kind): whole days from usage_day, partial days from usage_interval (§4)
        acc, _ = day_sums(session, ws=ws, we=we, tenant_id=tenant_id, mode="days" if bucket_seconds else "total")
    else:
        acc, _ = window_sums(session, fine, ws=ws, we=we, bucket_seconds=bucket_seconds, tenant_id=tenant_id)
    return usage_rows(pricing, acc, fine, cols, bucket_seconds)


def usage_rows(
    pricing: Pricing, acc: ByteSeconds, fine: list[str], cols: list[str], bucket_seconds: int | None
) -> list[UsageRow]:
    """Price the fine rows and merge them to ``cols`` (and the bucket), costs exact until rounded."""
    rates = RateCache(pricing)
    ti, ki = fine.index("tenant_id"), fine.index("kind")
    pos = [fine.index(c) for c in cols]
    # per output row: [byte-seconds, {rate denominator: sum of byte-seconds x numerator}]
    out: dict[tuple[Any, ...], list[Any]] = {}
    for fkey, bs in acc.items():
        num, den = rates.get(fkey[ti], fkey[ki])
        okey: tuple[Any, ...] = tuple(fkey[i] for i in pos)
        if bucket_seconds is not None:
            okey = (*okey, fkey[-1])
        slot = out.get(okey)
        if slot is None:
            slot = out[okey] = [0, {}]
        slot[0] += bs
        slot[1][den] = slot[1].get(den, 0) + bs * num
    rows = []
    for okey, (bs, by_den) in out.items():
        labels: dict[str, Any] = dict(zip(cols, okey, strict=False))
        if bucket_seconds is not None:
            labels["bucket"] = bucket_label(okey[-1], bucket_seconds)
        if len(by_den) == 1:
            [(d, n)] = by_den.items()
            cost = Fraction(n, d)
        else:
            cost = sum((Fraction(n, d) for d, n in by_den.items()), Fraction(0))
        rows.append(UsageRow(key=labels, byte_seconds=bs, cost_exact_usd=cost))
    rows.sort(key=lambda r: tuple(str(v) for v in r.key.values()))
    return rows


def series(rows: Iterable[UsageRow], *, start: datetime, end: datetime, bucket_seconds: int = DAY) -> list[dict[str, Any]]:
    """Dense per-bucket totals (zeros included) of bucketed rows: for charts and CSV."""
    ws, we = epoch(start), epoch(end)
    sums: dict[str, list[Any]] = {}
    for b in range(ws // bucket_seconds, (we - 1) // bucket_seconds + 1):
        sums[bucket_label(b, bucket_seconds)] = [0, Fraction(0)]
    for r in rows:
        slot = sums.setdefault(r.key["bucket"], [0, Fraction(0)])
        slot[0] += r.byte_seconds
        slot[1] += r.cost_exact_usd
    out = []
    for label, (bs, cost) in sums.items():
        b_start = max(ws, epoch(parse_bucket_label(label)))
        b_end = min(we, epoch(parse_bucket_label(label)) + bucket_seconds)
        span = max(1, b_end - b_start)
        out.append(
            {
                "bucket": label,
                "byte_seconds": bs,
                "average_gb": float(Decimal(bs) / span / GB),
                "gb_hours": float(Decimal(bs) / (GB * 3600)),
                "cost_usd": str(round_cents(cost)),
            }
        )
    return out


# --- current usage ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurrentRow:
    """Checkpoints storing bytes at an instant, per group, with a 720-hour cost projection."""

    key: dict[str, Any]
    """The group's columns and their values."""
    checkpoint_count: int
    logical_bytes: int
    monthly_cost_exact_usd: Fraction
    """Cost of keeping today's bytes for 720 hours (the projection)."""

    @property
    def monthly_cost_usd(self) -> Decimal:
        return round_cents(self.monthly_cost_exact_usd)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.key)
        out.update(
            checkpoint_count=self.checkpoint_count,
            logical_bytes=self.logical_bytes,
            logical_gb=float(Decimal(self.logical_bytes) / GB),
            projected_monthly_cost_usd=str(self.monthly_cost_usd),
        )
        return out


def current(
    session: Session, pricing: Pricing, *, now: datetime, group_by: Sequence[str] = ("tenant_id",), tenant_id: str | None = None
) -> list[CurrentRow]:
    """Checkpoints storing bytes at ``now`` per group, with a 720-hour cost projection."""
    cols = check_groups(group_by)
    fine = fine_groups(cols)
    if "run_id" not in fine:  # per (tenant, kind): from usage_day and today's edges (§4)
        _, found = day_sums(session, ws=epoch(now), we=epoch(now), tenant_id=tenant_id, mode="state")
    else:
        found = stored_at(session, fine, at=epoch(now), tenant_id=tenant_id)
    return current_rows(pricing, found, fine, cols)


def current_rows(pricing: Pricing, found: Stored, fine: list[str], cols: list[str]) -> list[CurrentRow]:
    """Price the fine ``[count, bytes]`` rows and merge them to ``cols``; largest first."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for fkey, (count, size) in found.items():
        kv = dict(zip(fine, fkey, strict=False))
        cost = pricing.cost(size * SECONDS_PER_MONTH, kv["tenant_id"], kv["kind"])
        slot = out.setdefault(tuple(kv[c] for c in cols), [0, 0, Fraction(0)])
        slot[0] += count
        slot[1] += size
        slot[2] += cost
    rows = [
        CurrentRow(key=dict(zip(cols, k, strict=False)), checkpoint_count=c, logical_bytes=s, monthly_cost_exact_usd=m)
        for k, (c, s, m) in out.items()
    ]
    rows.sort(key=lambda r: (-r.logical_bytes, tuple(str(v) for v in r.key.values())))
    return rows
