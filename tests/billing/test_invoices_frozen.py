"""Numbered, provisional and frozen invoices (issue 12, part 7): exact numbers, the provisional label,
a closed month unchanged by a later ledger correction whose difference appears (exact cents) as an
adjustment on the next invoice not yet frozen, lines naming base model and checkpoint count, and the
checkpoint-level rows."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from weightstore.billing import invoices
from weightstore.billing.pricing import Pricing
from weightstore.db import session_scope
from weightstore.models import InvoiceSnapshot, Tenant, TrainingRun

GB = 10**9
PRICES = Pricing(default=Decimal("0.10"))
JAN10, JAN20, JAN25 = (datetime(2026, 1, d, tzinfo=UTC) for d in (10, 20, 25))
FEB5, MAR2 = datetime(2026, 2, 5, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)
HOUR = 3600


@pytest.fixture
def acme(engine, ledger):  # type: ignore[no-untyped-def]
    """acme/run-1 (Qwen/Qwen3-8B): a 10 GB training checkpoint from Jan 10 (open-ended), a 2 GB
    sampler checkpoint Jan 20 - Jan 25."""
    with session_scope(engine) as s:
        s.add(Tenant(id="acme", name="acme", created_at=JAN10))
        s.flush()
        s.add(TrainingRun(id="run-1", tenant_id="acme", base_model="Qwen/Qwen3-8B", created_at=JAN10, last_request_time=JAN10))
    ledger.commit("c1", JAN10, 10 * GB, run="run-1", kind="training")
    ledger.commit("c2", JAN20, 2 * GB, run="run-1", kind="sampler")
    ledger.end("c2", JAN25, 2 * GB, run="run-1", kind="sampler")
    return ledger


def read(engine, month: str, now: datetime) -> invoices.Invoice:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return invoices.invoice(s, PRICES, tenant_id="acme", month=month, now=now)


def test_numbers_provisional_label_lines_and_checkpoint_rows(engine, acme):
    jan = read(engine, "2026-01", FEB5)
    assert (jan.number, jan.status, jan.provisional) == ("WS-acme-202601", "final", False)
    # training: 10 GB x 22 days (528 h) = 5280 GB-h = $0.7333 -> 0.73; sampler: 2 GB x 120 h = 240 GB-h -> 0.03
    assert [ln.as_dict() for ln in jan.lines] == [
        {
            "run_id": "run-1",
            "base_model": "Qwen/Qwen3-8B",
            "kind": "sampler",
            "checkpoint_count": 1,
            "byte_seconds": 2 * GB * 120 * HOUR,
            "gb_hours": 240.0,
            "gb_months": "0.333333333",
            "rate_usd_per_gb_month": "0.10",
            "amount_usd": "0.03",
        },
        {
            "run_id": "run-1",
            "base_model": "Qwen/Qwen3-8B",
            "kind": "training",
            "checkpoint_count": 1,
            "byte_seconds": 10 * GB * 528 * HOUR,
            "gb_hours": 5280.0,
            "gb_months": "7.333333333",
            "rate_usd_per_gb_month": "0.10",
            "amount_usd": "0.73",
        },
    ]
    assert jan.total_usd == Decimal("0.76") and jan.adjustments == []
    assert [
        (r["tinker_path"], r["billed_from"], r["billed_until"], r["byte_seconds"], r["amount_usd"])
        for r in jan.checkpoint_csv_rows()
    ] == [
        ("", "2026-01-20T00:00:00+00:00", "2026-01-25T00:00:00+00:00", 2 * GB * 120 * HOUR, "0.03"),
        ("", "2026-01-10T00:00:00+00:00", "2026-02-01T00:00:00+00:00", 10 * GB * 528 * HOUR, "0.73"),
    ]  # no checkpoint rows in the catalog here: no name, so no tinker path
    assert {r["number"] for r in jan.checkpoint_csv_rows()} == {"WS-acme-202601"}

    feb = read(engine, "2026-02", FEB5)  # to date: Feb 1 .. Feb 5 = 96 h x 10 GB = 960 GB-h -> $0.1333
    assert (feb.number, feb.status, feb.provisional) == ("WS-acme-202602", "provisional", True)
    assert feb.measured_until == FEB5 and feb.total_usd == Decimal("0.13")
    assert feb.as_dict()["provisional"] is True and feb.as_dict()["number"] == "WS-acme-202602"
    with session_scope(engine) as s:  # only the closed month was frozen
        assert [(r.month, r.number, r.total_usd) for r in s.query(InvoiceSnapshot)] == [("2026-01", "WS-acme-202601", "0.76")]


def test_closed_month_is_frozen_and_a_correction_is_adjusted_on_the_next_invoice(engine, acme):
    jan_before = read(engine, "2026-01", FEB5).as_dict()  # closes January
    # a late correction: c1 really ended on Jan 25 (written to the ledger on Feb 5)
    acme.end("c1", JAN25, 10 * GB, run="run-1", kind="training")
    # January is unchanged (the recomputed month would be 10 GB x 360 h = 3600 GB-h -> 0.50 + 0.03)
    assert read(engine, "2026-01", MAR2).as_dict() == jan_before
    with session_scope(engine) as s:
        assert invoices.compute(s, PRICES, tenant_id="acme", month="2026-01", now=None).charges_usd == Decimal("0.53")
    feb = read(engine, "2026-02", FEB5)
    assert feb.lines == [] and feb.charges_usd == Decimal("0.00")
    assert [a.as_dict() for a in feb.adjustments] == [
        {
            "adjusts_month": "2026-01",
            "adjusts_invoice": "WS-acme-202601",
            "byte_seconds": -10 * GB * 168 * HOUR,
            "gb_hours": -1680.0,
            "amount_usd": "-0.23",
            "description": "correction of 2026-01 (WS-acme-202601) after it was closed",
        }
    ]
    assert feb.total_usd == Decimal("-0.23") and feb.as_dict()["adjustments_usd"] == "-0.23"
    # February closes carrying the adjustment; March has nothing left to adjust
    feb_final = read(engine, "2026-02", MAR2)
    assert feb_final.status == "final" and feb_final.total_usd == Decimal("-0.23")
    assert [a.amount_usd for a in feb_final.adjustments] == [Decimal("-0.23")]
    assert read(engine, "2026-03", MAR2).adjustments == []
    # closing again is idempotent: the frozen document comes back
    assert read(engine, "2026-02", datetime(2026, 6, 1, tzinfo=UTC)).as_dict() == feb_final.as_dict()
    with session_scope(engine) as s:
        assert [(r.month, r.total_usd) for r in s.query(InvoiceSnapshot).order_by(InvoiceSnapshot.month)] == [
            ("2026-01", "0.76"),
            ("2026-02", "-0.23"),
        ]


def test_a_price_change_after_closing_is_not_an_adjustment(engine, acme):
    read(engine, "2026-01", FEB5)
    with session_scope(engine) as s:
        feb = invoices.invoice(s, Pricing(default=Decimal("0.50")), tenant_id="acme", month="2026-02", now=FEB5)
    assert feb.adjustments == []  # January is recomputed at the rates frozen with it


def test_without_now_nothing_is_frozen_and_lines_equal_the_usage_path(engine, acme):
    from weightstore.billing.units import month_window
    from weightstore.billing.usage import usage

    with session_scope(engine) as s:
        inv = invoices.invoice(s, PRICES, tenant_id="acme", month="2026-01")
        start, end = month_window("2026-01")
        rows = usage(s, PRICES, start=start, end=end, group_by=("run_id", "kind"), tenant_id="acme")
        assert s.query(InvoiceSnapshot).count() == 0
    assert {(ln.run_id, ln.kind): (ln.byte_seconds, ln.amount_usd) for ln in inv.lines} == {
        (r.key["run_id"], r.key["kind"]): (r.byte_seconds, r.cost_usd) for r in rows
    }
