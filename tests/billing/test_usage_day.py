"""The derived ``usage_day`` table (per tenant, kind and UTC day: sums over the interval edges) and the
billing paths that read it (overview, current usage, daily/window usage per tenant and kind), on
SQLite and PostgreSQL (``db_url``). Reference: the same numbers from ``usage_interval`` (the previous
code path, ``aggregates.window_sums``) and plain Python."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlmodel import select

from alembic import command
from tests.billing.ledger_builder import T0, h
from tests.billing.test_metering import _EVENTS, _OPS
from weightstore import db
from weightstore.billing import aggregates, overview, units, usage
from weightstore.billing.intervals import derive_intervals, rebuild_days, rebuild_intervals
from weightstore.billing.pricing import Pricing
from weightstore.billing.units import DAY, SPLIT
from weightstore.db import session_scope
from weightstore.models import OPEN_END_S, Checkpoint, Tenant, TrainingRun, UsageDay, UsageEvent, UsageInterval

GB = 10**9
PRICE = Pricing(default=Decimal("0.10"), per_kind={"sampler": Decimal("0.07")})


def day_rows(engine) -> dict[tuple[str, str, int], tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """usage_day as stored (split columns kept apart); rows whose sums are all zero mean "no edges"
    (the writers leave them behind when an edge moves to another day) and are dropped."""
    with session_scope(engine) as s:
        rows = s.exec(select(UsageDay)).all()
    out = {}
    for r in rows:
        sums = (r.starts, r.start_bytes, r.start_off_hi, r.start_off_lo, r.stops, r.stop_bytes, r.stop_off_hi, r.stop_off_lo)
        if any(sums):
            out[(r.tenant_id, r.kind, r.day)] = sums
    return out


def days_from_intervals(engine) -> dict[tuple[str, str, int], tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """usage_day's definition in plain Python over the usage_interval rows (docs/design-billing.md §3)."""
    with session_scope(engine) as s:
        intervals = s.exec(select(UsageInterval)).all()
    out: dict[tuple[str, str, int], list[int]] = {}
    for iv in intervals:
        edges = [(0, iv.start_s)] + ([] if iv.stop_s == OPEN_END_S else [(4, iv.stop_s)])
        for base, at in edges:
            slot = out.setdefault((iv.tenant_id, iv.kind, at // DAY), [0] * 8)
            slot[base] += 1
            slot[base + 1] += iv.size_bytes
            slot[base + 2] += iv.size_bytes // SPLIT * (at % DAY)
            slot[base + 3] += iv.size_bytes % SPLIT * (at % DAY)
    return {k: tuple(v) for k, v in out.items()}


def interval_path(engine, ws: int, we: int, tenant_id: str | None = None):  # type: ignore[no-untyped-def]
    """Daily byte-seconds per (tenant, kind, day) and the state at ``we``, read from usage_interval."""
    with session_scope(engine) as s:
        return aggregates.window_sums(
            s, ["tenant_id", "kind"], ws=ws, we=we, bucket_seconds=DAY, tenant_id=tenant_id, current_at_end=True
        )


def day_path(engine, ws: int, we: int, tenant_id: str | None = None):  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return aggregates.day_sums(s, ws=ws, we=we, tenant_id=tenant_id)


@hsettings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=_EVENTS, ops=_OPS, ws=st.integers(-DAY, 4 * DAY), wlen=st.integers(1, 9 * DAY))
def test_property_maintained_usage_day_equals_rebuild_and_python(engine, ledger, events, ops, ws, wlen):
    """After random commits, ends, TTL changes and restores (some out of order, some stops later on
    the day of ``now``), the usage_day the writers maintain equals a rebuild and a plain-Python
    computation from usage_interval; the billing read from it equals the interval-based read."""
    ledger.reset()
    ledger.replay(events, ops, ops_one_transaction_each=True)
    maintained = day_rows(engine)
    assert maintained == days_from_intervals(engine)
    with session_scope(engine) as s:
        assert rebuild_days(s) == len(maintained)
    assert day_rows(engine) == maintained
    # both read paths agree exactly: windows/now on and off day boundaries, all tenants and one
    w0 = units.epoch(T0) + ws
    for we in (w0 + wlen, (w0 + wlen) // DAY * DAY + DAY):
        assert day_path(engine, w0, we) == interval_path(engine, w0, we)
        assert day_path(engine, w0, we, "t2") == interval_path(engine, w0, we, "t2")


def test_overview_on_a_partial_day_with_expiries_later_today(engine, ledger):
    """``now`` in the middle of a day whose usage_day row already holds later edges (an expiry at
    20:00, an end written ahead at 22:00); the window starts mid-day too."""
    day0 = T0  # 2026-01-10 00:00 UTC
    now = day0 + timedelta(days=3, hours=12, seconds=7)
    start = day0 + timedelta(hours=6, minutes=30)
    ledger.commit("old", day0 - timedelta(days=5), 3 * GB)  # stored throughout
    ledger.commit("today", now - h(2), 5 * GB, tenant="globex", expires_at=now.replace(hour=20, second=0))
    ledger.commit("ending", day0 + h(1), 7, kind="sampler")
    ledger.end("ending", now.replace(hour=22, second=0), 7, kind="sampler")  # a stop recorded ahead
    ledger.commit("gone", day0 + h(8), 11)
    ledger.end("gone", now - h(1), 11)  # stopped earlier today
    ledger.commit("at-now", now, 13)  # current, no usage yet
    ledger.commit("later", now + h(1), 17, tenant="initech")  # not yet current
    with session_scope(engine) as s:
        ov = overview.overview(s, PRICE, now=now, start=start)
    ws, we = units.epoch(start), units.epoch(now)
    assert {(r.key["tenant_id"], r.checkpoint_count, r.logical_bytes) for r in ov.current} == {
        ("acme", 3, 3 * GB + 7 + 13),
        ("globex", 1, 5 * GB),
    }
    stored = {
        "acme": [
            (3 * GB, -(10**12), 10**12),
            (7, units.epoch(day0 + h(1)), we + 10 * 3600),
            (11, units.epoch(day0 + h(8)), we - 3600),
        ],
        "globex": [(5 * GB, we - 7200, we + 8 * 3600)],
    }
    expected: dict[tuple[str, str], int] = {}
    for tenant, ivs in stored.items():
        for size, a, z in ivs:
            for d in range(ws // DAY, (we - 1) // DAY + 1):
                overlap = min(z, we, (d + 1) * DAY) - max(a, ws, d * DAY)
                if overlap > 0:
                    key = (tenant, units.from_epoch(d * DAY).date().isoformat())
                    expected[key] = expected.get(key, 0) + size * overlap
    assert {(r.key["tenant_id"], r.key["bucket"]): r.byte_seconds for r in ov.daily} == expected
    assert day_path(engine, ws, we) == interval_path(engine, ws, we)
    with session_scope(engine) as s:  # the same numbers through the public functions
        assert ov.current == usage.current(s, PRICE, now=now)
        assert ov.daily == usage.usage(s, PRICE, start=start, end=now, bucket_seconds=DAY)


def test_window_usage_without_buckets_reads_usage_day_and_matches_the_intervals(engine, ledger):
    ledger.commit("a", T0 + h(3), 2 * GB, expires_at=T0 + h(60))
    ledger.commit("b", T0 - h(30), GB, kind="sampler", tenant="globex")
    ledger.end("b", T0 + h(50), GB, kind="sampler", tenant="globex")
    start, end = T0 + timedelta(hours=1, seconds=1), T0 + timedelta(days=2, hours=5)
    with session_scope(engine) as s:
        rows = usage.usage(s, PRICE, start=start, end=end, group_by=("tenant_id", "kind"))
        by_run = usage.usage(s, PRICE, start=start, end=end, group_by=("tenant_id", "run_id"))  # interval path
    got = {(r.key["tenant_id"], r.key["kind"]): r.byte_seconds for r in rows}
    assert got == {
        ("acme", "training"): 2 * GB * (53 - 3) * 3600,  # [3 h, 53 h): the window ends first
        ("globex", "sampler"): GB * (50 * 3600 - 3601),
    }  # [1 h 1 s, 50 h)
    assert sum(got.values()) == sum(r.byte_seconds for r in by_run)


def test_service_writers_and_bulk_expiry_maintain_usage_day(engine):
    """The service's ledger writers, including the bulk ``on_end_expired`` (many checkpoints, one
    statement), keep usage_day equal to its definition, in the writer's own transaction."""
    from weightstore.billing import ledger as ledger_mod

    with session_scope(engine) as s:
        s.add(Tenant(id="acme", name="acme", created_at=T0))
        s.add(TrainingRun(id="run-1", tenant_id="acme", base_model="m", created_at=T0, last_request_time=T0))
        s.flush()
        for i in range(6):
            ck = Checkpoint(
                id=f"k{i}",
                tenant_id="acme",
                run_id="run-1",
                kind=("training", "sampler")[i % 2],
                name=f"s{i}",
                size_bytes=GB + i,
                created_at=T0 + h(5 * i),
                expires_at=T0 + h(20 + 11 * i),
            )
            s.add(ck)
            s.flush()
            ledger_mod.on_commit(s, ck, now=T0 + h(5 * i))
    assert day_rows(engine) == days_from_intervals(engine)
    with session_scope(engine) as s:
        ck = s.get(Checkpoint, "k0")
        ck.expires_at = T0 + h(100)  # the expiry moves to another day: its stop edge moves
        s.add(ck)
        ledger_mod.on_ttl(s, ck, now=T0 + h(1))
        ledger_mod.on_end(s, s.get(Checkpoint, "k1"), at=T0 + h(7), now=T0 + h(7))
    assert day_rows(engine) == days_from_intervals(engine)
    with session_scope(engine) as s:  # the collector, 3 days later: each end stamped at its expires_at
        ledger_mod.on_end_expired(s, ["k2", "k3", "k4", "k5"], now=T0 + h(200))
    assert day_rows(engine) == days_from_intervals(engine)
    with session_scope(engine) as s:
        rows = {r.checkpoint_id: r.stop_s for r in s.exec(select(UsageInterval)).all()}
    t0 = units.epoch(T0)
    assert {k: rows[k] for k in ("k2", "k3", "k4", "k5")} == {f"k{i}": t0 + (20 + 11 * i) * 3600 for i in range(2, 6)}
    before = day_rows(engine)
    with session_scope(engine) as s:
        rebuild_intervals(s)
    assert day_rows(engine) == before


def test_migration_0004_derives_usage_day_from_an_existing_ledger(db_url):
    """Down to 0003 (usage_day dropped), a ledger written the way 0003-era code wrote it (raw events,
    then ``derive_intervals``, what ``rebuild_intervals`` was before usage_day), up again: the data
    step fills usage_day; ``alembic check`` stays clean."""
    cfg = db.alembic_config(db_url)
    command.downgrade(cfg, "0003_billing_indexes")
    eng = db.make_engine(db_url, pool_size=2)
    try:
        with session_scope(eng) as s:
            assert not sa.inspect(s.connection()).has_table("usage_day")
            for i, (tenant, kind, start_h, stop_h) in enumerate(
                [("acme", "training", 0, 30), ("acme", "training", 5, None), ("globex", "sampler", 25.5, 26)]
            ):
                common = dict(
                    tenant_id=tenant,
                    run_id="r",
                    checkpoint_id=f"c{i}",
                    kind=kind,
                    size_bytes=10**15 + i,
                    expires_at=None,
                    recorded_at=T0,
                )
                s.add(UsageEvent(event="commit", at=T0 + h(start_h), **common))
                if stop_h is not None:
                    s.add(UsageEvent(event="end", at=T0 + h(stop_h), **common))
            s.flush()
            assert derive_intervals(s) == 3
        db.upgrade(db_url)
        command.check(cfg)
        expected = days_from_intervals(eng)
        assert day_rows(eng) == expected
        t0 = units.epoch(T0)
        assert expected[("acme", "training", t0 // DAY)][:2] == (2, 2 * 10**15 + 1)
        assert expected[("globex", "sampler", t0 // DAY + 1)][5] == 10**15 + 2
    finally:
        eng.dispose()
