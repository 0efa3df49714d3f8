"""Monthly invoices: one calendar month (UTC) of one tenant, a line per (run, kind).

Each line is rounded half-even to the cent and the total is the sum of the rounded lines
(docs/design-billing.md §5, §6)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlmodel import Session

from weightstore.billing.pricing import Pricing
from weightstore.billing.units import BYTE_SECONDS_PER_GB_MONTH, GB, month_window
from weightstore.billing.usage import usage


@dataclass(frozen=True)
class InvoiceLine:
    """One (run, kind) of an invoice."""

    run_id: str
    kind: str
    byte_seconds: int
    rate_usd_per_gb_month: Decimal
    amount_usd: Decimal
    """Rounded half-even to the cent."""

    @property
    def gb_months(self) -> Decimal:
        return Decimal(self.byte_seconds) / BYTE_SECONDS_PER_GB_MONTH

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "kind": self.kind,
            "byte_seconds": self.byte_seconds,
            "gb_hours": float(round(Decimal(self.byte_seconds) / (GB * 3600), 6)),
            "gb_months": str(round(self.gb_months, 9)),
            "rate_usd_per_gb_month": str(self.rate_usd_per_gb_month),
            "amount_usd": str(self.amount_usd),
        }


@dataclass(frozen=True)
class Invoice:
    """One tenant's month: its lines, sorted by (kind, run)."""

    tenant_id: str
    month: str
    """``YYYY-MM``."""
    period_start: datetime
    period_end: datetime
    lines: list[InvoiceLine]

    @property
    def total_usd(self) -> Decimal:
        """Sum of the rounded lines (the invoice adds up by construction)."""
        return sum((line.amount_usd for line in self.lines), Decimal("0.00"))

    @property
    def byte_seconds(self) -> int:
        return sum(line.byte_seconds for line in self.lines)

    def by_kind(self) -> list[dict[str, Any]]:
        acc: dict[str, list[Any]] = {}
        for line in self.lines:
            slot = acc.setdefault(line.kind, [0, Decimal("0.00")])
            slot[0] += line.byte_seconds
            slot[1] += line.amount_usd
        return [
            {"kind": k, "byte_seconds": v[0], "gb_hours": float(round(Decimal(v[0]) / (GB * 3600), 6)), "amount_usd": str(v[1])}
            for k, v in sorted(acc.items())
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "month": self.month,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "currency": "USD",
            "total_usd": str(self.total_usd),
            "byte_seconds": self.byte_seconds,
            "by_kind": self.by_kind(),
            "lines": [line.as_dict() for line in self.lines],
            "rounding": "each line rounded half-even to the cent; total = sum of lines",
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        return [{"tenant_id": self.tenant_id, "month": self.month, **line.as_dict()} for line in self.lines]


def invoice(session: Session, pricing: Pricing, *, tenant_id: str, month: str, now: datetime | None = None) -> Invoice:
    """One calendar month (UTC) of one tenant, a line per (run, kind). With ``now`` inside the
    month, the invoice runs to date (open-ended checkpoints accrue until ``now``, never beyond)."""
    start, end = month_window(month)
    measured_end = end if now is None else min(end, now)
    rows = (
        []
        if measured_end <= start
        else usage(session, pricing, start=start, end=measured_end, group_by=("run_id", "kind"), tenant_id=tenant_id)
    )
    lines = [
        InvoiceLine(
            run_id=r.key["run_id"],
            kind=r.key["kind"],
            byte_seconds=r.byte_seconds,
            rate_usd_per_gb_month=pricing.rate(tenant_id, r.key["kind"]),
            amount_usd=r.cost_usd,
        )
        for r in rows
        if r.byte_seconds > 0
    ]
    lines.sort(key=lambda line: (line.kind, line.run_id))
    return Invoice(tenant_id=tenant_id, month=month, period_start=start, period_end=end, lines=lines)
