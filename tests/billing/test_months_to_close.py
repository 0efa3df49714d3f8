"""Which ended months the collector's ``invoices`` phase freezes (issue 12, part 7; part 1): every
month of every billed tenant from its first ledger event (or creation) to the last ended month, minus
those already frozen; a deleted tenant's stop at its final month; operator tenants never."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from weightstore.billing import invoices
from weightstore.billing.pricing import Pricing
from weightstore.db import session_scope
from weightstore.models import Tenant, TenantState

GB = 10**9
DEC20, JAN10, FEB5, APR2 = (datetime(*d, tzinfo=UTC) for d in ((2025, 12, 20), (2026, 1, 10), (2026, 2, 5), (2026, 4, 2)))


def test_months_to_close(engine, ledger):  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        s.add(Tenant(id="acme", name="acme", created_at=JAN10))
        s.add(Tenant(id="gone", name="gone", created_at=JAN10, state=TenantState.deleted))
        s.add(Tenant(id="ops", name="ops", created_at=JAN10, operator=True))
    ledger.commit("a1", DEC20, GB, tenant="acme")  # recorded before the tenant row's creation: December counts
    ledger.commit("g1", JAN10, GB, tenant="gone")
    ledger.end("g1", FEB5, GB, tenant="gone")  # its delete: February is its final month
    ledger.commit("o1", JAN10, GB, tenant="ops")
    with session_scope(engine) as s:
        assert invoices.months_to_close(s, now=APR2) == [
            ("acme", "2025-12"),
            ("acme", "2026-01"),
            ("acme", "2026-02"),
            ("acme", "2026-03"),
            ("gone", "2026-01"),
            ("gone", "2026-02"),
        ]
        invoices.close_month(s, Pricing(default=Decimal("0.10")), tenant_id="acme", month="2026-02", now=APR2)
    with session_scope(engine) as s:
        due = invoices.months_to_close(s, now=APR2)
    assert [m for t, m in due if t == "acme"] == ["2025-12", "2026-01", "2026-03"]
    with session_scope(engine) as s:
        assert invoices.months_to_close(s, now=datetime(2026, 1, 31, 23, tzinfo=UTC)) == [("acme", "2025-12")]
