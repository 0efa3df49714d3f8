"""Monthly invoices: one calendar month (UTC) of one tenant, numbered, provisional or frozen.

* **Lines**: one per (run, kind), naming the run's base model and how many checkpoints were billed;
  each rounded half-even to the cent, charges = the sum of the rounded lines (docs/design-billing.md §5).
  The lines are sums of **checkpoint rows** (one per checkpoint stored during the month, byte-seconds
  exact), which are also the invoice's checkpoint-level CSV.
* **Number**: ``invoice_number`` (``WS-<tenant>-<YYYYMM>``): a pure function of (tenant, month), so it is
  the same on every read, on every replica, before and after the month closes.
* **Provisional**: the current month (and any later one) runs *to date* (never bills the future, §6);
  it is recomputed on every read and labelled ``provisional``.
* **Frozen**: a month that has ended is closed the first time its invoice is read, when ``close_month``
  is called, or by the collector's ``invoices`` phase (``months_to_close``: every billed tenant's ended
  months not yet frozen): the whole document is written once into ``invoice_snapshot`` and every later read
  returns exactly that document. A later ledger correction of a closed month never changes it; the
  difference between the month recomputed now (at the rates frozen with it) and its snapshot, less
  what earlier frozen invoices already adjusted, is an **adjustment line** on the next invoice that is
  not yet frozen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from weightstore.billing.billable import billed_tenant_ids
from weightstore.billing.pricing import Pricing
from weightstore.billing.units import BYTE_SECONDS_PER_GB_MONTH, FIRST_MONTH, GB, epoch, from_epoch, month_window, round_cents
from weightstore.models import InvoiceSnapshot, Tenant, TenantState, UsageEvent
from weightstore.names import SEGMENT_BY_KIND

PROVISIONAL, FINAL = "provisional", "final"
UNKNOWN_BASE_MODEL = "unknown"
"""Base model shown for a run whose row is gone (runs can be deleted; their bills stay)."""
ZERO = Decimal("0.00")


def invoice_number(tenant_id: str, month: str) -> str:
    """``WS-<tenant>-<YYYYMM>``: stable for (tenant, month), unique across tenants (tenant ids are
    unique and contain no spaces), sortable by month within a tenant."""
    return f"WS-{tenant_id}-{month.replace('-', '')}"


def _gb_hours(byte_seconds: int) -> float:
    return float(round(Decimal(byte_seconds) / (GB * 3600), 6))


@dataclass(frozen=True)
class CheckpointUsage:
    """One checkpoint's storage inside the invoice's period (a row of the checkpoint-level CSV)."""

    checkpoint_id: str
    run_id: str
    kind: str
    name: str | None
    """None if the checkpoint row is gone."""
    base_model: str
    size_bytes: int
    billed_from: datetime
    billed_until: datetime
    """Clipped to the period (and to now for a provisional invoice)."""
    byte_seconds: int
    amount_exact_usd: Fraction

    @property
    def tinker_path(self) -> str:
        segment = SEGMENT_BY_KIND.get(self.kind)
        return "" if segment is None or self.name is None else f"tinker://{self.run_id}/{segment}/{self.name}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "tinker_path": self.tinker_path,
            "run_id": self.run_id,
            "base_model": self.base_model,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "billed_from": self.billed_from.isoformat(),
            "billed_until": self.billed_until.isoformat(),
            "byte_seconds": self.byte_seconds,
            "gb_hours": _gb_hours(self.byte_seconds),
            "amount_usd": str(round_cents(self.amount_exact_usd)),
        }


@dataclass(frozen=True)
class InvoiceLine:
    """One (run, kind) of an invoice."""

    run_id: str
    kind: str
    byte_seconds: int
    rate_usd_per_gb_month: Decimal
    amount_usd: Decimal
    """Rounded half-even to the cent."""
    base_model: str = UNKNOWN_BASE_MODEL
    checkpoint_count: int = 0
    """Checkpoints of this run and kind billed in the period."""

    @property
    def gb_months(self) -> Decimal:
        return Decimal(self.byte_seconds) / BYTE_SECONDS_PER_GB_MONTH

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "base_model": self.base_model,
            "kind": self.kind,
            "checkpoint_count": self.checkpoint_count,
            "byte_seconds": self.byte_seconds,
            "gb_hours": _gb_hours(self.byte_seconds),
            "gb_months": format(round(self.gb_months, 9), "f"),  # plain decimal, never 7E-9
            "rate_usd_per_gb_month": format(self.rate_usd_per_gb_month, "f"),
            "amount_usd": str(self.amount_usd),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InvoiceLine:
        return cls(
            run_id=d["run_id"],
            kind=d["kind"],
            byte_seconds=int(d["byte_seconds"]),
            rate_usd_per_gb_month=Decimal(d["rate_usd_per_gb_month"]),
            amount_usd=Decimal(d["amount_usd"]),
            base_model=d.get("base_model", UNKNOWN_BASE_MODEL),
            checkpoint_count=int(d.get("checkpoint_count", 0)),
        )


@dataclass(frozen=True)
class Adjustment:
    """A correction of an earlier, frozen month: recomputed now minus what was invoiced and adjusted."""

    month: str
    """The corrected month."""
    invoice_number: str
    """That month's invoice."""
    byte_seconds: int
    amount_usd: Decimal

    def as_dict(self) -> dict[str, Any]:
        return {
            "adjusts_month": self.month,
            "adjusts_invoice": self.invoice_number,
            "byte_seconds": self.byte_seconds,
            "gb_hours": _gb_hours(self.byte_seconds),
            "amount_usd": str(self.amount_usd),
            "description": f"correction of {self.month} ({self.invoice_number}) after it was closed",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Adjustment:
        return cls(
            month=d["adjusts_month"],
            invoice_number=d["adjusts_invoice"],
            byte_seconds=int(d["byte_seconds"]),
            amount_usd=Decimal(d["amount_usd"]),
        )


@dataclass(frozen=True)
class Invoice:
    """One tenant's month: its lines sorted by (kind, run), adjustments of earlier months, its status."""

    tenant_id: str
    month: str
    """``YYYY-MM``."""
    period_start: datetime
    period_end: datetime
    lines: list[InvoiceLine]
    number: str = ""
    status: str = PROVISIONAL
    """``provisional`` (the month has not ended: to date, recomputed on each read) or ``final`` (frozen)."""
    measured_until: datetime | None = None
    """The instant usage is measured up to (the period's end once closed, else the read's now)."""
    closed_at: datetime | None = None
    adjustments: list[Adjustment] = field(default_factory=list)
    checkpoints: list[CheckpointUsage] | None = None
    """Checkpoint rows (None when read from a snapshot: see ``checkpoint_rows``)."""
    checkpoint_rows: list[dict[str, Any]] = field(default_factory=list)
    """The checkpoint-level CSV rows (as frozen, for a final invoice)."""
    billed: bool = True
    """False for a tenant that is not billed (an operator tenant: every rate is zero)."""

    @property
    def provisional(self) -> bool:
        return self.status == PROVISIONAL

    @property
    def charges_usd(self) -> Decimal:
        """Sum of the rounded lines."""
        return sum((line.amount_usd for line in self.lines), ZERO)

    @property
    def adjustments_usd(self) -> Decimal:
        return sum((a.amount_usd for a in self.adjustments), ZERO)

    @property
    def total_usd(self) -> Decimal:
        """Charges plus adjustments (the invoice adds up by construction)."""
        return self.charges_usd + self.adjustments_usd

    @property
    def byte_seconds(self) -> int:
        return sum(line.byte_seconds for line in self.lines)

    @property
    def checkpoint_count(self) -> int:
        return sum(line.checkpoint_count for line in self.lines)

    def by_kind(self) -> list[dict[str, Any]]:
        acc: dict[str, list[Any]] = {}
        for line in self.lines:
            slot = acc.setdefault(line.kind, [0, ZERO, 0])
            slot[0] += line.byte_seconds
            slot[1] += line.amount_usd
            slot[2] += line.checkpoint_count
        return [
            {"kind": k, "checkpoint_count": v[2], "byte_seconds": v[0], "gb_hours": _gb_hours(v[0]), "amount_usd": str(v[1])}
            for k, v in sorted(acc.items())
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "tenant_id": self.tenant_id,
            "month": self.month,
            "status": self.status,
            "provisional": self.provisional,
            "billed": self.billed,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "measured_until": None if self.measured_until is None else self.measured_until.isoformat(),
            "closed_at": None if self.closed_at is None else self.closed_at.isoformat(),
            "currency": "USD",
            "charges_usd": str(self.charges_usd),
            "adjustments_usd": str(self.adjustments_usd),
            "total_usd": str(self.total_usd),
            "byte_seconds": self.byte_seconds,
            "checkpoint_count": self.checkpoint_count,
            "by_kind": self.by_kind(),
            "lines": [line.as_dict() for line in self.lines],
            "adjustments": [a.as_dict() for a in self.adjustments],
            "rounding": "each line rounded half-even to the cent; total = sum of lines and adjustments",
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        head = {"number": self.number, "tenant_id": self.tenant_id, "month": self.month, "status": self.status}
        rows: list[dict[str, Any]] = [{**head, "line": "charge", **line.as_dict()} for line in self.lines]
        empty = {k: "" for k in InvoiceLine("", "", 0, ZERO, ZERO).as_dict()}
        for a in self.adjustments:
            rows.append(
                {
                    **head,
                    "line": "adjustment",
                    **empty,
                    "run_id": f"adjustment {a.month}",
                    "byte_seconds": a.byte_seconds,
                    "gb_hours": _gb_hours(a.byte_seconds),
                    "amount_usd": str(a.amount_usd),
                }
            )
        return rows

    def checkpoint_csv_rows(self) -> list[dict[str, Any]]:
        head = {"number": self.number, "tenant_id": self.tenant_id, "month": self.month}
        return [{**head, **row} for row in self.checkpoint_rows]


# --- computing a month from the ledger ----------------------------------------------------------
def checkpoint_usage(
    session: Session, pricing: Pricing, *, tenant_id: str, start: datetime, end: datetime, rates: dict[str, Decimal] | None = None
) -> list[CheckpointUsage]:
    """Every checkpoint of the tenant stored inside ``[start, end)``, with its exact byte-seconds there
    (``usage_interval``, one index range on ``(tenant_id, stop_s)``), its run's base model and its cost
    (at ``rates`` per kind where given, else the prices in force)."""
    ws, we = epoch(start), epoch(end)
    if we <= ws:
        return []
    stmt = sa.text(
        "SELECT ui.checkpoint_id, ui.run_id, ui.kind, ui.size_bytes, ui.start_s, ui.stop_s, c.name, r.base_model "
        "FROM usage_interval ui "
        "LEFT JOIN checkpoint c ON c.id = ui.checkpoint_id "
        "LEFT JOIN training_run r ON r.id = ui.run_id "
        "WHERE ui.tenant_id = :t AND ui.stop_s > :ws AND ui.start_s < :we "
        "ORDER BY ui.kind, ui.run_id, ui.start_s, ui.checkpoint_id"
    )
    out = []
    for cid, run_id, kind, size, start_s, stop_s, name, base_model in session.execute(stmt, {"t": tenant_id, "ws": ws, "we": we}):
        lo, hi = max(int(start_s), ws), min(int(stop_s), we)
        byte_seconds = int(size) * (hi - lo)
        if byte_seconds <= 0:
            continue
        rate = rates.get(kind) if rates is not None else None
        cost = (
            Fraction(byte_seconds) * Fraction(rate) / BYTE_SECONDS_PER_GB_MONTH
            if rate is not None
            else pricing.cost(byte_seconds, tenant_id, kind)
        )
        out.append(
            CheckpointUsage(
                checkpoint_id=cid,
                run_id=run_id,
                kind=kind,
                name=name,
                base_model=base_model or UNKNOWN_BASE_MODEL,
                size_bytes=int(size),
                billed_from=from_epoch(lo),
                billed_until=from_epoch(hi),
                byte_seconds=byte_seconds,
                amount_exact_usd=cost,
            )
        )
    return out


def lines_of(
    pricing: Pricing, tenant_id: str, rows: Iterable[CheckpointUsage], rates: dict[str, Decimal] | None = None
) -> list[InvoiceLine]:
    """Checkpoint rows summed per (run, kind): exact byte-seconds and cost, rounded once per line."""
    acc: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        slot = acc.setdefault((r.kind, r.run_id), [0, Fraction(0), 0, r.base_model])
        slot[0] += r.byte_seconds
        slot[1] += r.amount_exact_usd
        slot[2] += 1
    return [
        InvoiceLine(
            run_id=run_id,
            kind=kind,
            byte_seconds=bs,
            rate_usd_per_gb_month=(rates or {}).get(kind, pricing.rate(tenant_id, kind)),
            amount_usd=round_cents(cost),
            base_model=base_model,
            checkpoint_count=count,
        )
        for (kind, run_id), (bs, cost, count, base_model) in sorted(acc.items())
    ]


def _snapshots(session: Session, tenant_id: str, before: str) -> list[InvoiceSnapshot]:
    stmt = (
        select(InvoiceSnapshot)
        .where(col(InvoiceSnapshot.tenant_id) == tenant_id, col(InvoiceSnapshot.month) < before)
        .order_by(col(InvoiceSnapshot.month))
    )
    return list(session.exec(stmt))


def pending_adjustments(session: Session, pricing: Pricing, *, tenant_id: str, month: str) -> list[Adjustment]:
    """Corrections of frozen months before ``month`` not yet carried by a frozen invoice: per frozen
    month, its charges recomputed from today's ledger at the rates frozen with it, minus its frozen
    charges, minus the adjustments for it on the frozen invoices after it (and before ``month``)."""
    snaps = _snapshots(session, tenant_id, month)
    already: dict[str, list[Any]] = {}
    for s in snaps:
        for a in s.document.get("adjustments", []):
            slot = already.setdefault(a["adjusts_month"], [0, ZERO])
            slot[0] += int(a["byte_seconds"])
            slot[1] += Decimal(a["amount_usd"])
    out = []
    for s in snaps:
        start, end = month_window(s.month)
        rates = {k: Decimal(v) for k, v in s.document.get("rates", {}).items()}
        lines = lines_of(
            pricing, tenant_id, checkpoint_usage(session, pricing, tenant_id=tenant_id, start=start, end=end, rates=rates), rates
        )
        done = already.get(s.month, [0, ZERO])
        frozen_bs = sum(int(x["byte_seconds"]) for x in s.document["lines"])
        frozen_usd = sum((Decimal(x["amount_usd"]) for x in s.document["lines"]), ZERO)
        d_bs = sum(x.byte_seconds for x in lines) - frozen_bs - done[0]
        d_usd = sum((x.amount_usd for x in lines), ZERO) - frozen_usd - done[1]
        if d_bs or d_usd:
            out.append(Adjustment(month=s.month, invoice_number=s.number, byte_seconds=d_bs, amount_usd=d_usd))
    return out


def compute(session: Session, pricing: Pricing, *, tenant_id: str, month: str, now: datetime | None) -> Invoice:
    """The month from today's ledger (never frozen): to date if ``now`` is inside it."""
    start, end = month_window(month)
    measured_end = end if now is None else max(start, min(end, now))
    rows = checkpoint_usage(session, pricing, tenant_id=tenant_id, start=start, end=measured_end)
    return Invoice(
        tenant_id=tenant_id,
        month=month,
        period_start=start,
        period_end=end,
        lines=lines_of(pricing, tenant_id, rows),
        number=invoice_number(tenant_id, month),
        status=PROVISIONAL if now is not None and now < end else FINAL,
        measured_until=measured_end,
        adjustments=pending_adjustments(session, pricing, tenant_id=tenant_id, month=month),
        checkpoints=rows,
        checkpoint_rows=[r.as_dict() for r in rows],
        billed=pricing.billed(tenant_id),
    )


def _document(inv: Invoice, pricing: Pricing) -> dict[str, Any]:
    kinds = sorted({line.kind for line in inv.lines} | set(pricing.per_kind) | {"training", "sampler"})
    return {
        **inv.as_dict(),
        "rates": {k: str(pricing.rate(inv.tenant_id, k)) for k in kinds},
        "checkpoints": inv.checkpoint_rows,
    }


def from_snapshot(snap: InvoiceSnapshot) -> Invoice:
    doc = snap.document
    start, end = month_window(snap.month)
    return Invoice(
        tenant_id=snap.tenant_id,
        month=snap.month,
        period_start=start,
        period_end=end,
        lines=[InvoiceLine.from_dict(x) for x in doc["lines"]],
        number=snap.number,
        status=FINAL,
        measured_until=end,
        closed_at=snap.closed_at,
        adjustments=[Adjustment.from_dict(x) for x in doc.get("adjustments", [])],
        checkpoint_rows=list(doc.get("checkpoints", [])),
        billed=bool(doc.get("billed", True)),
    )


def close_month(session: Session, pricing: Pricing, *, tenant_id: str, month: str, now: datetime) -> Invoice:
    """Freeze an ended month (idempotent): the snapshot if there is one, else compute it and write it
    once. Two closers racing: the loser's insert fails on the primary key inside a savepoint and it
    returns the winner's snapshot. Refused (``ValueError``) for a month that has not ended."""
    return freeze_month(session, pricing, tenant_id=tenant_id, month=month, now=now)[0]


def freeze_month(session: Session, pricing: Pricing, *, tenant_id: str, month: str, now: datetime) -> tuple[Invoice, bool]:
    """``close_month``, also saying whether this call wrote the snapshot (False: it already existed,
    or a concurrent closer won). Catalog function."""
    start, end = month_window(month)
    if now < end:
        raise ValueError(f"{month} has not ended: its invoice is provisional")
    snap = session.get(InvoiceSnapshot, (tenant_id, month))
    if snap is not None:
        return from_snapshot(snap), False
    inv = compute(session, pricing, tenant_id=tenant_id, month=month, now=None)
    row = InvoiceSnapshot(
        tenant_id=tenant_id,
        month=month,
        number=inv.number,
        closed_at=now,
        total_usd=str(inv.total_usd),
        document=_document(inv, pricing),
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        won = session.get(InvoiceSnapshot, (tenant_id, month), populate_existing=True)
        assert won is not None
        return from_snapshot(won), False
    return from_snapshot(row), True


# --- closing ended months (the collector's ``invoices`` phase) -----------------------------------
def month_of(dt: datetime) -> str:
    """The calendar month (UTC) ``dt`` falls in, as ``YYYY-MM``."""
    dt = dt.astimezone(UTC)
    return f"{dt.year:04d}-{dt.month:02d}"


def next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


def previous_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year - (mon == 1):04d}-{(mon - 2) % 12 + 1:02d}"


def months_to_close(session: Session, *, now: datetime) -> list[tuple[str, str]]:
    """``(tenant, month)`` of every ended month of every billed tenant that is not frozen yet, oldest
    first per tenant (a close carries the adjustments of the frozen months before it). Catalog function.

    A tenant's months run from the earlier of its creation and its first ledger event to the last
    ended month; a deleted tenant's stop at the month of its last ledger event (its delete ends every
    checkpoint), so its final invoice is closed and no empty ones follow. Cheap when nothing is due:
    one row per billed tenant (first/last ledger instants from the ``(tenant_id, at)`` index) and
    the keys of the frozen invoices; operator tenants are not billed and never closed."""
    last_ended = previous_month(month_of(now))
    first_at = sa.select(sa.func.min(col(UsageEvent.at))).where(col(UsageEvent.tenant_id) == col(Tenant.id)).scalar_subquery()
    last_at = sa.select(sa.func.max(col(UsageEvent.at))).where(col(UsageEvent.tenant_id) == col(Tenant.id)).scalar_subquery()
    billed = billed_tenant_ids(session)
    rows = session.execute(
        sa.select(col(Tenant.id), col(Tenant.created_at), col(Tenant.state), first_at, last_at).where(col(Tenant.id).in_(billed))
    ).all()
    frozen = set(session.execute(sa.select(col(InvoiceSnapshot.tenant_id), col(InvoiceSnapshot.month))).tuples().all())
    due: list[tuple[str, str]] = []
    for tenant_id, created_at, state, first, last in sorted(rows):
        month = max(FIRST_MONTH, month_of(min(created_at, first) if first is not None else created_at))
        stop = last_ended
        if state == TenantState.deleted:
            stop = min(stop, month_of(max(created_at, last) if last is not None else created_at))
        while month <= stop:
            if (tenant_id, month) not in frozen:
                due.append((tenant_id, month))
            month = next_month(month)
    return due


def invoice(session: Session, pricing: Pricing, *, tenant_id: str, month: str, now: datetime | None = None) -> Invoice:
    """One calendar month (UTC) of one tenant. With ``now`` inside (or before) the month: provisional,
    to date (open-ended checkpoints accrue until ``now``, never beyond). An ended month is frozen
    (``close_month``); without ``now`` it is computed, never frozen (tests, tools)."""
    if now is None:
        return compute(session, pricing, tenant_id=tenant_id, month=month, now=None)
    _, end = month_window(month)
    if now >= end:
        return close_month(session, pricing, tenant_id=tenant_id, month=month, now=now)
    return compute(session, pricing, tenant_id=tenant_id, month=month, now=now)
