"""The collector's bookkeeping phases: ``invoices`` freezes every billed tenant's ended months (issue 12,
part 7: closed months frozen; part 1: the operator tenant is not billed), and ``archives`` prunes
archive-cache rows that can never be served again (issue 11 residue). Both run in the default run
under the lease, change nothing on a second run, and every test ends with ``verify()``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.billing.ledger_builder import LedgerBuilder
from tests.collector._util import new_run, principal, save
from tests.helpers import sampler_files
from weightstore import auth
from weightstore.billing import invoices
from weightstore.billing.pricing import load_pricing
from weightstore.clock import FakeClock
from weightstore.db import session_scope
from weightstore.errors import LeaseHeld
from weightstore.models import ArchiveCache, InvoiceSnapshot
from weightstore.names import TinkerPath
from weightstore.objectstore import blob_key
from weightstore.tinker import archive
from weightstore_gc import lease as gc_lease
from weightstore_gc import run, verify

GB = 10**9
MAR10, MAR15, MAR16, MAR20, MAR25 = (datetime(2026, 3, d, tzinfo=UTC) for d in (10, 15, 16, 20, 25))
APR1, MAY1 = datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    """A fixed, past instant (S3 objects written now look recent to the orphans phase: never collected)."""
    return FakeClock(MAR20)


def snapshots(ctx) -> dict[tuple[str, str], dict]:  # type: ignore[no-untyped-def]
    with session_scope(ctx.engine) as s:
        return {(r.tenant_id, r.month): dict(r.document) for r in s.exec(sa.select(InvoiceSnapshot)).scalars()}  # type: ignore[call-overload]


def invoice(ctx, tenant: str, month: str) -> invoices.Invoice:  # type: ignore[no-untyped-def]
    with session_scope(ctx.engine) as s:
        return invoices.invoice(s, load_pricing(s, ctx.settings), tenant_id=tenant, month=month, now=ctx.clock.now())


@pytest.fixture
def march(ctx, clock):  # type: ignore[no-untyped-def]
    """acme: 10 GB training from Mar 10 (open); globex: 30 GB sampler Mar 15-16 (1 GB-month: $0.10);
    ops (operator): 7 GB from Mar 10."""
    with session_scope(ctx.engine) as s:
        for name in ("acme", "globex"):
            auth.ensure_tenant(s, name, now=MAR20)
        auth.ensure_tenant(s, "ops", now=MAR20, operator=True)
    lb = LedgerBuilder(ctx.engine)
    lb.commit("c1", MAR10, 10 * GB, tenant="acme", run="run-1", kind="training")
    lb.commit("g1", MAR15, 30 * GB, tenant="globex", run="run-g", kind="sampler")
    lb.end("g1", MAR16, 30 * GB, tenant="globex", run="run-g", kind="sampler")
    lb.commit("o1", MAR10, 7 * GB, tenant="ops", run="run-o", kind="training")
    return lb


def test_ended_months_are_frozen_once_for_every_billed_tenant(ctx, clock, march):
    """issue 12, part 7 (and part 1): past the month's end one collector run freezes March for acme and
    globex (never for the operator), with exact totals; a second run changes nothing; a later ledger
    correction leaves the frozen invoice alone and becomes an adjustment on April, which the May run
    freezes with it."""
    assert run(ctx).stats["invoices"] == {"closed_months": 0, "already_frozen": 0, "deferred_months": 0}  # March is open
    assert snapshots(ctx) == {}
    clock.set(APR1 + timedelta(hours=1))
    dry = run(ctx, ["invoices"], dry_run=True)
    assert dry.plan["invoices"] == {"close_months": 2, "close_tenants": 2} and snapshots(ctx) == {}
    rep = run(ctx)
    assert rep.state == "finished"
    assert rep.stats["invoices"] == {"closed_months": 2, "already_frozen": 0, "deferred_months": 0}
    frozen = snapshots(ctx)
    assert sorted(frozen) == [("acme", "2026-03"), ("globex", "2026-03")]  # never ("ops", ...)
    # acme: 10 GB x 22 days (528 h) = 5280 GB-h = 7.33 GB-months x $0.10; globex: 30 GB x 24 h = $0.10
    assert {k: (d["number"], d["status"], d["total_usd"]) for k, d in frozen.items()} == {
        ("acme", "2026-03"): ("WS-acme-202603", "final", "0.73"),
        ("globex", "2026-03"): ("WS-globex-202603", "final", "0.10"),
    }
    # a second collector run: nothing due, nothing rewritten
    again = run(ctx)
    assert again.plan["invoices"] == {"close_months": 0, "close_tenants": 0}
    assert again.stats["invoices"]["closed_months"] == 0 and snapshots(ctx) == frozen
    # a late correction: c1 really ended on Mar 25 (10 GB x 360 h = $0.50 instead of $0.73)
    march.end("c1", MAR25, 10 * GB, tenant="acme", run="run-1", kind="training")
    run(ctx)
    assert snapshots(ctx) == frozen
    assert str(invoice(ctx, "acme", "2026-03").total_usd) == "0.73"  # read back: the frozen document
    april = invoice(ctx, "acme", "2026-04")
    assert april.provisional and [a.as_dict()["amount_usd"] for a in april.adjustments] == ["-0.23"]
    clock.set(MAY1 + timedelta(hours=1))
    rep = run(ctx)
    assert rep.stats["invoices"] == {"closed_months": 2, "already_frozen": 0, "deferred_months": 0}
    frozen = snapshots(ctx)
    assert sorted(frozen) == [("acme", "2026-03"), ("acme", "2026-04"), ("globex", "2026-03"), ("globex", "2026-04")]
    apr = frozen[("acme", "2026-04")]
    assert (apr["charges_usd"], apr["adjustments_usd"], apr["total_usd"]) == ("0.00", "-0.23", "-0.23")
    assert [a["adjusts_invoice"] for a in apr["adjustments"]] == ["WS-acme-202603"]
    assert frozen[("globex", "2026-04")]["total_usd"] == "0.00"
    assert verify(ctx).clean


def test_only_the_lease_holder_closes_months(ctx, clock, march):
    """issue 12, part 7: a second collector while the first holds the lease closes nothing."""
    clock.set(APR1 + timedelta(hours=1))
    held = gc_lease.acquire(ctx.engine, clock, ttl_seconds=60, owner="other-host:1:x")
    with pytest.raises(LeaseHeld):
        run(ctx)
    assert snapshots(ctx) == {}
    held.release()
    assert run(ctx).stats["invoices"]["closed_months"] == 2
    assert verify(ctx).clean


def test_a_month_frozen_by_a_read_is_left_alone(ctx, clock, march):
    """issue 12, part 7: a month already frozen (its invoice was read first) is not recomputed."""
    clock.set(APR1 + timedelta(hours=1))
    read_first = invoice(ctx, "acme", "2026-03").as_dict()
    rep = run(ctx)
    assert rep.stats["invoices"] == {"closed_months": 1, "already_frozen": 0, "deferred_months": 0}  # globex only
    assert invoice(ctx, "acme", "2026-03").as_dict() == read_first
    assert verify(ctx).clean


def test_a_month_that_fails_to_close_never_stops_the_collector(ctx, clock, march, monkeypatch):
    """issue 12, part 7: billing must not block garbage collection: a close that fails is a warning
    finding, the other tenants' months close, the storage phases run, and the next run closes it."""
    clock.set(APR1 + timedelta(hours=1))
    real = invoices.freeze_month

    def flaky(session, pricing, *, tenant_id, month, now):  # type: ignore[no-untyped-def]
        if tenant_id == "globex":
            raise RuntimeError("boom")
        return real(session, pricing, tenant_id=tenant_id, month=month, now=now)

    monkeypatch.setattr(invoices, "freeze_month", flaky)
    rep = run(ctx)
    assert rep.state == "finished" and rep.phases[-1] == "archives" and "orphans" in rep.stats
    assert rep.stats["invoices"] == {"closed_months": 1, "already_frozen": 0, "deferred_months": 1}
    assert [(f.kind, f.subject, f.severity) for f in rep.findings] == [("invoice_not_closed", "globex/2026-03", "warning")]
    monkeypatch.setattr(invoices, "freeze_month", real)
    assert run(ctx).stats["invoices"]["closed_months"] == 1
    assert sorted(snapshots(ctx)) == [("acme", "2026-03"), ("globex", "2026-03")]
    assert verify(ctx).clean


def test_archive_cache_rows_are_pruned_when_they_can_never_be_served(ctx, clock, keys):
    """issue 11 residue: the cache row of an expired checkpoint goes at the next run; a live
    checkpoint's row stays while its archive blob is live, goes once the sweep collected that blob
    (nothing references an archive: it is rebuilt, identical, on the next request)."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    short = save(ctx, p, run_id, "short", sampler_files(1), ttl=3600)
    kept = save(ctx, p, run_id, "kept", sampler_files(2))
    urls = {path: archive.archive_url(ctx, p, TinkerPath.parse(path)) for path in (short, kept)}
    built = {path: u.sha256 for path, u in urls.items()}

    def cached() -> dict[str, str]:
        with session_scope(ctx.engine) as s:
            return {r.checkpoint_id: r.sha256 for r in s.exec(sa.select(ArchiveCache)).scalars()}  # type: ignore[call-overload]

    assert sorted(cached().values()) == sorted(built.values())
    with session_scope(ctx.engine) as s:
        ids = {path: archive._source(s, p, TinkerPath.parse(path), now=clock.now())[0].id for path in (short, kept)}
    clock.advance(hours=2)  # `short` is expired (in the trash); `kept`'s archive blob is inside its grace period
    rep = run(ctx)
    assert rep.plan["archives"] == {"stale_archive_rows": 1, "stale_archive_bytes": urls[short].size_bytes}
    assert rep.stats["archives"] == {"pruned_archive_rows": 1}
    assert cached() == {ids[kept]: built[kept]}
    assert run(ctx).stats["archives"] == {"pruned_archive_rows": 0}  # a second run changes nothing
    assert verify(ctx).clean
    # past the grace period the sweep collects both unreferenced archive blobs; the rows follow
    clock.advance(seconds=ctx.settings.gc_grace_seconds + 3600)
    rep = run(ctx)
    assert ctx.store.head(blob_key(built[kept])) is None
    assert rep.stats["archives"] == {"pruned_archive_rows": 1} and cached() == {}
    assert archive.archive_url(ctx, p, TinkerPath.parse(kept)).sha256 == built[kept]  # rebuilt, identical
    assert cached() == {ids[kept]: built[kept]}
    assert verify(ctx).clean
