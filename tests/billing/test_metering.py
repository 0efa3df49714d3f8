"""Exact-number tests of the metering core, on SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlmodel import select

from tests.billing.ledger_builder import T0, h
from weightstore.billing import catalog, invoices, overview, units, usage
from weightstore.billing.intervals import rebuild_intervals
from weightstore.billing.pricing import Pricing, load_pricing
from weightstore.billing.units import DAY, HOUR
from weightstore.db import session_scope
from weightstore.models import (
    OPEN_END_S,
    Blob,
    Checkpoint,
    CheckpointFile,
    Tenant,
    TrainingRun,
    UsageEvent,
    UsageInterval,
)

GB = 10**9
PRICE = Pricing(default=Decimal("0.10"))


def total(engine, start, end, **kw):  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return usage.usage(s, kw.pop("pricing", PRICE), start=start, end=end, **kw)


def test_one_gb_for_72_hours_costs_exactly_one_cent(engine, ledger):
    ledger.commit("c1", T0, GB)
    ledger.end("c1", T0 + h(72), GB)
    [row] = total(engine, T0 - h(24), T0 + h(200))
    assert row.byte_seconds == GB * 72 * 3600
    assert row.cost_exact_usd == Fraction(1, 100)
    assert row.cost_usd == Decimal("0.01")
    with session_scope(engine) as s:
        inv = invoices.invoice(s, PRICE, tenant_id="acme", month="2026-01")
    assert inv.total_usd == Decimal("0.01")
    assert [(ln.run_id, ln.kind, ln.amount_usd) for ln in inv.lines] == [("run-1", "training", Decimal("0.01"))]


def test_huge_checkpoints_over_long_windows_stay_exact(engine, ledger):
    # 10^15 bytes x ~400 days of seconds is ~3.5e22 byte-seconds: far beyond 64 bits, per row
    big = 10**15 + 7
    ledger.commit("big", T0, big)
    ledger.commit("big2", T0 + h(5), big, kind="sampler")
    ledger.end("big2", T0 + h(29), big, kind="sampler")
    ledger.commit("small", T0 + h(1), 3)
    start, end = T0 - h(24), T0 + h(24 * 400)
    [row] = total(engine, start, end, group_by=())
    assert row.byte_seconds == big * 400 * 86400 + big * 24 * 3600 + 3 * (400 * 86400 - 3600)
    daily = total(engine, start, end, group_by=(), bucket_seconds=DAY)
    assert sum(r.byte_seconds for r in daily) == row.byte_seconds
    by_day = {r.key["bucket"]: r.byte_seconds for r in daily}
    assert by_day["2026-01-10"] == big * 86400 + big * 19 * 3600 + 3 * 23 * 3600  # T0's day
    assert by_day["2026-01-11"] == big * 86400 + big * 5 * 3600 + 3 * 86400
    with session_scope(engine) as s:
        ov = overview.overview(s, PRICE, now=end, start=start)
    assert [(r.checkpoint_count, r.logical_bytes) for r in ov.current] == [(2, big + 3)]
    assert [r.byte_seconds for r in ov.daily] == [r.byte_seconds for r in daily]


def test_created_and_deleted_in_the_same_hour_costs_its_fraction(engine, ledger):
    ledger.commit("c1", T0 + timedelta(minutes=10), GB)
    ledger.end("c1", T0 + timedelta(minutes=40), GB)
    rows = total(engine, T0 - h(2), T0 + h(2), bucket_seconds=HOUR)
    assert [(r.key["bucket"], r.byte_seconds) for r in rows] == [(T0.isoformat(), GB * 1800)]
    # 1800 s of 1 GB = 0.5 GB-hour = 0.5/720 GB-month
    assert rows[0].cost_exact_usd == Fraction(1, 10) * 1800 / (720 * 3600)
    assert rows[0].cost_usd == Decimal("0.00")


def test_month_boundary_is_split_between_two_invoices(engine, ledger):
    start = datetime(2026, 1, 31, 6, 30, tzinfo=UTC)
    end = datetime(2026, 2, 1, 18, 0, tzinfo=UTC)
    size = 7 * GB + 123
    ledger.commit("c1", start, size)
    ledger.end("c1", end, size)
    with session_scope(engine) as s:
        jan = invoices.invoice(s, PRICE, tenant_id="acme", month="2026-01")
        feb = invoices.invoice(s, PRICE, tenant_id="acme", month="2026-02")
        mar = invoices.invoice(s, PRICE, tenant_id="acme", month="2026-03")
    assert jan.byte_seconds == size * int((datetime(2026, 2, 1, tzinfo=UTC) - start).total_seconds())
    assert feb.byte_seconds == size * int((end - datetime(2026, 2, 1, tzinfo=UTC)).total_seconds())
    assert jan.byte_seconds + feb.byte_seconds == size * int((end - start).total_seconds())
    assert mar.lines == [] and mar.total_usd == Decimal("0.00")
    [whole] = total(engine, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    assert whole.byte_seconds == jan.byte_seconds + feb.byte_seconds


def test_expired_checkpoint_stops_at_expires_at_not_when_the_collector_runs(engine, ledger):
    ledger.commit("c1", T0, GB, expires_at=T0 + h(10))
    window = (T0, T0 + h(48))
    [before] = total(engine, *window)
    assert before.byte_seconds == GB * 10 * 3600  # no end row yet: still stops at expires_at
    # the collector notices 30 hours later and writes end at=expires_at
    ledger.end("c1", T0 + h(10), GB, expires_at=T0 + h(10))
    [after] = total(engine, *window)
    assert after.byte_seconds == before.byte_seconds


def test_ttl_changes_and_restore(engine, ledger):
    ledger.commit("a", T0, GB, expires_at=T0 + h(10))
    ledger.ttl("a", T0 + h(5), GB, T0 + h(20))  # extended
    ledger.commit("b", T0, GB, expires_at=T0 + h(10))
    ledger.ttl("b", T0 + h(5), GB, None)  # TTL removed: open-ended
    ledger.commit("c", T0, GB, expires_at=T0 + h(10))
    ledger.end("c", T0 + h(10), GB, expires_at=T0 + h(10))
    ledger.restore("c", T0 + h(15), GB, None)  # restore undoes the expiry: billed without a gap
    rows = total(engine, T0, T0 + h(30), group_by=("tenant_id",))
    assert rows[0].byte_seconds == GB * 3600 * (20 + 30 + 30)


def test_daily_buckets_and_groupings(engine, ledger):
    ledger.commit("a", T0 + h(12), 2 * GB, run="r1", kind="training")
    ledger.end("a", T0 + h(12 + 48), 2 * GB, run="r1", kind="training")
    ledger.commit("b", T0, GB, run="r2", kind="sampler", tenant="globex")
    rows = total(engine, T0, T0 + timedelta(days=3), group_by=(), bucket_seconds=DAY)
    assert [(r.key["bucket"], r.byte_seconds) for r in rows] == [
        ("2026-01-10", (2 * 12 + 24) * GB * 3600),
        ("2026-01-11", (2 * 24 + 24) * GB * 3600),
        ("2026-01-12", (2 * 12 + 24) * GB * 3600),
    ]
    by_kind = {r.key["kind"]: r.byte_seconds for r in total(engine, T0, T0 + timedelta(days=3), group_by=("kind",))}
    assert by_kind == {"training": 2 * GB * 48 * 3600, "sampler": GB * 72 * 3600}
    only_acme = total(engine, T0, T0 + timedelta(days=3), group_by=("run_id",), tenant_id="acme")
    assert [(r.key["run_id"], r.byte_seconds) for r in only_acme] == [("r1", 2 * GB * 48 * 3600)]


def test_pricing_precedence_tenant_then_kind_then_default(engine, ledger):
    ledger.commit("a", T0, GB, kind="training")
    ledger.end("a", T0 + h(720), GB, kind="training")
    ledger.commit("b", T0, GB, kind="sampler")
    ledger.end("b", T0 + h(720), GB, kind="sampler")
    ledger.commit("c", T0, GB, kind="sampler", tenant="vip")
    ledger.end("c", T0 + h(720), GB, kind="sampler", tenant="vip")
    with session_scope(engine) as s:
        s.add(Tenant(id="vip", name="vip", created_at=T0, price_per_gb_month_usd=0.05))
    from weightstore.settings import Settings

    with session_scope(engine) as s:
        p = load_pricing(s, Settings(price_per_kind_usd={"training": 0.12}))
        rows = {
            (r.key["tenant_id"], r.key["kind"]): r.cost_usd
            for r in usage.usage(s, p, start=T0, end=T0 + h(800), group_by=("tenant_id", "kind"))
        }
    assert rows == {
        ("acme", "training"): Decimal("0.12"),
        ("acme", "sampler"): Decimal("0.10"),
        ("vip", "sampler"): Decimal("0.05"),
    }


def test_current_usage_and_projection(engine, ledger):
    ledger.commit("a", T0, 3 * GB, kind="training")
    ledger.commit("b", T0, GB, kind="sampler", expires_at=T0 + h(1))
    ledger.commit("c", T0, GB, kind="sampler")
    ledger.end("c", T0 + h(2), GB, kind="sampler")
    with session_scope(engine) as s:
        [row] = usage.current(s, PRICE, now=T0 + h(0.5))
        later = usage.current(s, PRICE, now=T0 + h(5), group_by=("kind",))
    assert (row.checkpoint_count, row.logical_bytes, row.monthly_cost_usd) == (3, 5 * GB, Decimal("0.50"))
    assert [(r.key, r.logical_bytes) for r in later] == [({"kind": "training"}, 3 * GB)]


def test_dedup_bills_twice_logically_once_physically(engine, ledger):
    sha = "ab" * 32
    with session_scope(engine) as s:
        s.add(Tenant(id="acme", name="acme", created_at=T0))
        s.add(TrainingRun(id="run-1", tenant_id="acme", base_model="m", created_at=T0, last_request_time=T0))
        s.add(Blob(sha256=sha, size_bytes=GB, state="live", created_at=T0, last_referenced_at=T0))
        s.flush()
        for cid, kind in (("c1", "training"), ("c2", "sampler")):
            s.add(Checkpoint(id=cid, tenant_id="acme", run_id="run-1", kind=kind, name="step-1", size_bytes=GB, created_at=T0))
            s.flush()
            s.add(CheckpointFile(checkpoint_id=cid, path="adapter_model.safetensors", size_bytes=GB, sha256=sha))
    ledger.commit("c1", T0, GB, kind="training")
    ledger.commit("c2", T0, GB, kind="sampler")
    with session_scope(engine) as s:
        [cur] = usage.current(s, PRICE, now=T0 + h(1))
        physical = catalog.physical_current(s, now=T0 + h(1))
    assert cur.logical_bytes == 2 * GB
    assert physical == {"acme": GB}
    [row] = total(engine, T0, T0 + h(72))
    assert row.cost_usd == Decimal("0.02")  # billed logically: both checkpoints


_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["t1", "t2", "t3"]),
        st.sampled_from(["training", "sampler"]),
        st.integers(0, 10 * DAY),
        st.one_of(st.none(), st.integers(1, 5 * DAY)),
        st.one_of(st.none(), st.integers(1, 6 * DAY)),
        st.integers(1, 5 * 10**12),
    ),
    min_size=1,
    max_size=12,
)


@hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=_EVENTS, ws=st.integers(0, 3 * DAY), wlen=st.integers(1, 9 * DAY))
def test_property_buckets_and_tenants_add_up(engine, ledger, events, ws, wlen):
    ledger.reset()
    ledger.replay(events, [], ops_one_transaction_each=False)
    start, end = T0 + timedelta(seconds=ws), T0 + timedelta(seconds=ws + wlen)
    pricing = Pricing(default=Decimal("0.10"), per_kind={"sampler": Decimal("0.07")})
    by_tenant = total(engine, start, end, group_by=("tenant_id",), pricing=pricing)
    grand = total(engine, start, end, group_by=(), pricing=pricing)
    daily = total(engine, start, end, group_by=("tenant_id",), bucket_seconds=DAY, pricing=pricing)
    # reference: plain Python over the same events
    expected: dict[str, int] = {}
    for tenant, _kind, s0, life, ttl, size in events:
        e0 = min(x for x in (s0 + (life or 10**9), s0 + (ttl or 10**9)))
        overlap = max(0, min(e0, ws + wlen) - max(s0, ws))
        if overlap:
            expected[tenant] = expected.get(tenant, 0) + size * overlap
    assert {r.key["tenant_id"]: r.byte_seconds for r in by_tenant} == expected
    grand_bs = grand[0].byte_seconds if grand else 0
    assert grand_bs == sum(expected.values())
    for tenant, bs in expected.items():
        assert sum(r.byte_seconds for r in daily if r.key["tenant_id"] == tenant) == bs  # exact
        exact = sum(r.cost_exact_usd for r in daily if r.key["tenant_id"] == tenant)
        assert exact == next(r.cost_exact_usd for r in by_tenant if r.key["tenant_id"] == tenant)
        n_days = sum(1 for r in daily if r.key["tenant_id"] == tenant)
        # the stated rule: lines round half-even; a sum of n rounded lines is within n/2 cents of exact
        rounded = sum(r.cost_usd for r in daily if r.key["tenant_id"] == tenant)
        assert abs(Fraction(rounded) - exact) <= Fraction(5, 1000) * n_days
    # sum over tenants equals the grand total to the cent: exact costs add up exactly, rounded once
    assert sum(r.cost_exact_usd for r in by_tenant) == (grand[0].cost_exact_usd if grand else 0)
    assert abs(Fraction(sum(r.cost_usd for r in by_tenant)) - Fraction(grand[0].cost_usd if grand else 0)) <= Fraction(
        5, 1000
    ) * len(by_tenant)


@hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=_EVENTS, ws=st.integers(0, 3 * DAY), wlen=st.integers(1, 9 * DAY))
def test_property_overview_is_current_plus_daily_buckets_in_one_pass(engine, ledger, events, ws, wlen):
    ledger.reset()
    ledger.replay(events, [], ops_one_transaction_each=False)
    # one checkpoint committed exactly at `now`: current, but no usage yet
    ledger.commit("at-now", T0 + timedelta(seconds=ws + wlen), 7, tenant="t4")
    start, now = T0 + timedelta(seconds=ws), T0 + timedelta(seconds=ws + wlen)
    pricing = Pricing(default=Decimal("0.10"), per_kind={"sampler": Decimal("0.07")})
    with session_scope(engine) as s:
        ov = overview.overview(s, pricing, now=now, start=start, bucket_seconds=DAY)
        cur = usage.current(s, pricing, now=now)
        daily = usage.usage(s, pricing, start=start, end=now, bucket_seconds=DAY)
    assert ov.current == cur
    assert ov.daily == daily
    assert any(r.key == {"tenant_id": "t4"} and r.checkpoint_count == 1 for r in ov.current)
    # reference per (tenant, day): plain Python overlap of each interval with each bucket
    expected: dict[tuple[str, str], int] = {}
    t0 = units.epoch(T0)
    for tenant, _kind, s0, life, ttl, size in events:
        e0 = min(s0 + (life or 10**9), s0 + (ttl or 10**9))
        a, z = t0 + max(s0, ws), t0 + min(e0, ws + wlen)
        b = a // DAY
        while b * DAY < z:
            overlap = min(z, (b + 1) * DAY) - max(a, b * DAY)
            if overlap > 0:
                key = (tenant, units.from_epoch(b * DAY).date().isoformat())
                expected[key] = expected.get(key, 0) + size * overlap
            b += 1
    assert {(r.key["tenant_id"], r.key["bucket"]): r.byte_seconds for r in ov.daily} == expected
    with session_scope(engine) as s:  # one tenant at a time (PostgreSQL reads it another way)
        for tenant in ("t1", "t2", "t3"):
            one = usage.usage(s, pricing, start=start, end=now, bucket_seconds=DAY, tenant_id=tenant)
            assert {r.key["bucket"]: r.byte_seconds for r in one} == {b: v for (t, b), v in expected.items() if t == tenant}
            assert usage.current(s, pricing, now=now, tenant_id=tenant) == [r for r in ov.current if r.key["tenant_id"] == tenant]


# --- the derived usage_interval table ------------------------------------------------------------
def _interval_rows(engine) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return {
            r.checkpoint_id: (r.tenant_id, r.run_id, r.kind, r.size_bytes, r.start_s, r.end_s, r.expires_s, r.stop_s)
            for r in s.exec(select(UsageInterval)).all()
        }


def _recompute_from_ledger(engine) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    """The interval rule in plain Python over the raw ledger rows (docs/design-billing.md §2)."""
    with session_scope(engine) as s:
        events = s.exec(select(UsageEvent).order_by(UsageEvent.id)).all()  # type: ignore[arg-type]
    by_ck: dict[str, list[UsageEvent]] = {}
    for ev in events:
        by_ck.setdefault(ev.checkpoint_id, []).append(ev)
    out = {}
    for ck, evs in by_ck.items():
        commits = [e for e in evs if e.event == "commit"]
        if not commits:
            continue
        last_restore = max((e.id for e in evs if e.event == "restore"), default=0)
        ends = [units.epoch(e.at) for e in evs if e.event == "end" and e.id > last_restore]
        start = min(units.epoch(e.at) for e in commits)
        end = min(ends) if ends else None
        exp = None if evs[-1].expires_at is None else units.epoch(evs[-1].expires_at)
        stop = min([x for x in (end, exp) if x is not None], default=OPEN_END_S)
        out[ck] = (
            evs[0].tenant_id,
            evs[0].run_id,
            evs[0].kind,
            max(e.size_bytes for e in commits),
            start,
            end,
            exp,
            max(start, stop),
        )
    return out


_OPS = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["end", "ttl", "ttl-none", "restore"]), st.integers(-2 * DAY, 6 * DAY)),
    max_size=14,
)


@hsettings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=_EVENTS, ops=_OPS, ws=st.integers(0, 3 * DAY), wlen=st.integers(1, 9 * DAY))
def test_property_derived_intervals_equal_the_ledger(engine, ledger, events, ops, ws, wlen):
    """After random commits, ends, TTL changes and restores (some out of order), the table the
    writers maintain equals a rebuild from the ledger and a plain-Python recomputation; and
    billing over it equals the reference overlap sum."""
    ledger.reset()
    ledger.replay(events, ops, ops_one_transaction_each=False)
    maintained = _interval_rows(engine)
    assert maintained == _recompute_from_ledger(engine)
    with session_scope(engine) as s:
        assert rebuild_intervals(s) == len(maintained)
    assert _interval_rows(engine) == maintained
    # billing = plain overlap sums over the recomputed intervals; daily buckets add up to the window
    w0, w1 = units.epoch(T0) + ws, units.epoch(T0) + ws + wlen
    expected: dict[str, int] = {}
    for tenant, _run, _kind, size, start, _end, _exp, stop in maintained.values():
        overlap = max(0, min(stop, w1) - max(start, w0))
        if overlap:
            expected[tenant] = expected.get(tenant, 0) + size * overlap
    window = (T0 + timedelta(seconds=ws), T0 + timedelta(seconds=ws + wlen))
    assert {r.key["tenant_id"]: r.byte_seconds for r in total(engine, *window)} == expected
    daily: dict[str, int] = {}
    for r in total(engine, *window, bucket_seconds=DAY):
        daily[r.key["tenant_id"]] = daily.get(r.key["tenant_id"], 0) + r.byte_seconds
    assert daily == expected
    with session_scope(engine) as s:
        now_rows = usage.current(s, PRICE, now=window[0])
    live: dict[str, int] = {}
    for tenant, _run, _kind, size, start, _end, _exp, stop in maintained.values():
        if start <= w0 < stop:
            live[tenant] = live.get(tenant, 0) + size
    assert {r.key["tenant_id"]: r.logical_bytes for r in now_rows} == live


def test_service_writers_and_bulk_expiry_maintain_the_derived_table(engine):
    """The ledger writers used by the service (commit, ttl, end, bulk expiry, restore) keep
    usage_interval equal to a rebuild, in the writer's own transaction."""
    from weightstore.billing import ledger as ledger_mod

    with session_scope(engine) as s:
        s.add(Tenant(id="acme", name="acme", created_at=T0))
        s.add(TrainingRun(id="run-1", tenant_id="acme", base_model="m", created_at=T0, last_request_time=T0))
        s.flush()
        cks = [
            Checkpoint(
                id=f"k{i}",
                tenant_id="acme",
                run_id="run-1",
                kind="training",
                name=f"s{i}",
                size_bytes=GB,
                created_at=T0,
                expires_at=T0 + h(10 + i),
            )
            for i in range(3)
        ]
        for ck in cks:
            s.add(ck)
            s.flush()
            ledger_mod.on_commit(s, ck, now=T0)
    with session_scope(engine) as s:
        ck = s.get(Checkpoint, "k0")
        ck.expires_at = None
        s.add(ck)
        ledger_mod.on_ttl(s, ck, now=T0 + h(1))
        ledger_mod.on_end(s, s.get(Checkpoint, "k1"), at=T0 + h(2), now=T0 + h(2))
        ledger_mod.on_end_expired(s, ["k2"], now=T0 + h(30))
    rows = _interval_rows(engine)
    t0 = units.epoch(T0)
    assert {k: (v[4], v[7]) for k, v in rows.items()} == {
        "k0": (t0, OPEN_END_S),
        "k1": (t0, t0 + 2 * 3600),
        "k2": (t0, t0 + 12 * 3600),
    }
    with session_scope(engine) as s:
        ledger_mod.on_restore(s, s.get(Checkpoint, "k2"), now=T0 + h(31))
    assert _interval_rows(engine)["k2"][7] == t0 + 12 * 3600  # stops at its expires_at, still
    assert _interval_rows(engine) == _recompute_from_ledger(engine)
    with session_scope(engine) as s:
        rebuild_intervals(s)
    assert _interval_rows(engine) == _recompute_from_ledger(engine)
