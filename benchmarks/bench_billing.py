"""Billing latency over a large ledger, SQLite and PostgreSQL side by side.

Builds a ledger of N checkpoint intervals (default 1,000,000: a ``commit`` row each, an ``end`` row
for half of them, TTLs on a quarter) spread over 100 tenants and 90 days, bulk-inserted
(executemany on SQLite, COPY on PostgreSQL), derives ``usage_interval`` from it with
``intervals.rebuild_intervals`` (the same SQL the ledger writers run per checkpoint; a test asserts
the maintained table equals a rebuild), then times:

* ``invoice``: one month's invoice of the largest tenant and of a typical one;
* ``overview``: what the admin overview page computes (current usage of all tenants, physical
  bytes, 14 daily buckets of all tenants);
* ``usage 30d by day``: the tenant page's chart query for the largest tenant;
* ``current usage, all tenants`` and the overview without physical bytes, separately;
* ``ledger write``: one ledger event with its derived rows (``usage_interval``, ``usage_day``), in its
  own transaction, on the loaded tables (milliseconds per event, median).

With the ``usage_day`` code, a cross-check (untimed) asserts that its read path equals the
interval-based one on this data for windows on and off day boundaries.

Writes ``benchmarks/results/billing.md``. Usage: ``python benchmarks/bench_billing.py [--n 1000000]``.

``--cache DIR`` keeps the loaded and derived data between runs (loading and deriving take minutes):
the SQLite file is copied there, the PostgreSQL ``usage_event``/``usage_interval`` rows are saved
with ``COPY TO``; a later run with the same ``--n`` copies them back (``COPY FROM``) into a database
migrated to ``CACHE_REVISION``, then applies the newer migrations (0004 derives ``usage_day`` from the
restored intervals), instead of loading and deriving again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

from weightstore import db
from weightstore.billing import aggregates, catalog, intervals, invoices, overview, units, usage
from weightstore.billing.pricing import Pricing
from weightstore.db import session_scope
from weightstore.models import UsageEventKind

NOW = datetime(2026, 3, 20, tzinfo=UTC)
START = NOW - timedelta(days=90)
CACHE_REVISION = "0003_billing_indexes"
"""Schema of the saved PostgreSQL rows (``usage_event``, ``usage_interval``): a cached run restores them
into a database migrated to this revision, then applies the newer migrations (their data steps run)."""
COLS = ("tenant_id", "run_id", "checkpoint_id", "kind", "event", "at", "size_bytes", "expires_at", "recorded_at")


def rows(n: int, seed: int = 0):  # type: ignore[no-untyped-def]
    rnd = random.Random(seed)
    span = int((NOW - START).total_seconds())
    for i in range(n):
        # tenant 0 holds 20% of the checkpoints, the other 99 share the rest
        t = 0 if rnd.random() < 0.2 else rnd.randrange(1, 100)
        tenant, run = f"tenant-{t:03d}", f"tenant-{t:03d}:run-{rnd.randrange(20)}"
        kind = "training" if rnd.random() < 0.5 else "sampler"
        at = START + timedelta(seconds=rnd.randrange(span))
        size = rnd.randrange(10**7, 5 * 10**9)
        exp = at + timedelta(hours=rnd.randrange(1, 2000)) if rnd.random() < 0.25 else None
        ck = f"ck-{i}"
        yield (tenant, run, ck, kind, "commit", at, size, exp)
        if rnd.random() < 0.5:
            end = at + timedelta(hours=rnd.randrange(1, 1000))
            if exp is not None:
                end = min(end, exp)
            if end < NOW:
                yield (tenant, run, ck, kind, "end", end, size, exp)


def load_sqlite(path: Path, n: int) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    batch = []
    for tenant, run, ck, kind, ev, at, size, exp in rows(n):
        batch.append(
            (
                tenant,
                run,
                ck,
                kind,
                ev,
                at.replace(tzinfo=None).strftime(fmt),
                size,
                exp.replace(tzinfo=None).strftime(fmt) if exp else None,
                at.replace(tzinfo=None).strftime(fmt),
            )
        )
        if len(batch) >= 100_000:
            con.executemany(f"INSERT INTO usage_event ({', '.join(COLS)}) VALUES (?,?,?,?,?,?,?,?,?)", batch)
            batch.clear()
    con.executemany(f"INSERT INTO usage_event ({', '.join(COLS)}) VALUES (?,?,?,?,?,?,?,?,?)", batch)
    con.commit()
    con.execute("ANALYZE")
    con.close()


def load_pg(url: str, n: int) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as con:
        with con.cursor() as cur, cur.copy(f"COPY usage_event ({', '.join(COLS)}) FROM STDIN") as cp:
            for tenant, run, ck, kind, ev, at, size, exp in rows(n):
                cp.write_row((tenant, run, ck, kind, ev, at, size, exp, at))
        con.execute("ANALYZE usage_event")


def load_catalog(url: str, every: int = 5) -> int:
    """Catalog rows for the physical-bytes query: every ``every``-th checkpoint stored at NOW (about
    100,000 at 1,000,000 intervals) gets a ``checkpoint`` row and two files: its own blob (size - 1 MB)
    and a 1 MB blob shared by all checkpoints of its run (dedup). Returns the checkpoint count."""
    engine = db.make_engine(url)
    pg = engine.dialect.name == "postgresql"
    ts = "CAST(:t0 AS TIMESTAMP WITH TIME ZONE)" if pg else ":t0"
    now = int(NOW.timestamp())
    live = (
        f"FROM usage_interval WHERE start_s <= {now} AND stop_s > {now} "
        f"AND CAST(substr(checkpoint_id, 4) AS INTEGER) % {every} = 0"
    )
    stmts = [
        f"INSERT INTO tenant (id, name, created_at) SELECT DISTINCT tenant_id, tenant_id, {ts} FROM usage_interval",
        f"""INSERT INTO training_run (id, tenant_id, base_model, train_mlp, train_attn, train_unembed, trainable,
              created_at, last_request_time)
            SELECT DISTINCT run_id, tenant_id, 'base', true, true, false, true, {ts}, {ts} FROM usage_interval""",
        f"""INSERT INTO blob (sha256, size_bytes, state, created_at, last_referenced_at)
            SELECT DISTINCT 's-' || run_id, 1000000, 'live', {ts}, {ts} {live}""",
        f"""INSERT INTO blob (sha256, size_bytes, state, created_at, last_referenced_at)
            SELECT 'u-' || checkpoint_id, size_bytes - 1000000, 'live', {ts}, {ts} {live}""",
        f"""INSERT INTO checkpoint (id, tenant_id, run_id, kind, name, state, size_bytes, created_at, public)
            SELECT checkpoint_id, tenant_id, run_id, kind, checkpoint_id, 'committed', size_bytes, {ts}, false {live}""",
        f"""INSERT INTO checkpoint_file (checkpoint_id, path, size_bytes, sha256)
            SELECT checkpoint_id, 'adapter.bin', size_bytes - 1000000, 'u-' || checkpoint_id {live}""",
        f"""INSERT INTO checkpoint_file (checkpoint_id, path, size_bytes, sha256)
            SELECT checkpoint_id, 'shared.bin', 1000000, 's-' || run_id {live}""",
    ]
    t0 = "2026-01-01 00:00:00+00:00" if pg else "2026-01-01 00:00:00.000000"
    with session_scope(engine) as s:
        for stmt in stmts:
            s.execute(sa.text(stmt), {"t0": t0})
        n = int(s.execute(sa.text("SELECT COUNT(*) FROM checkpoint")).scalar_one())
    with engine.connect() as c:
        c.exec_driver_sql("ANALYZE")
        c.commit()
    engine.dispose()
    return n


def derive(url: str) -> float:
    """Populate usage_interval from the bulk-loaded ledger; returns seconds."""
    engine = db.make_engine(url)
    t = time.perf_counter()
    with session_scope(engine) as s:
        intervals.rebuild_intervals(s)
    with engine.connect() as c:
        c.exec_driver_sql("ANALYZE")
        c.commit()
    engine.dispose()
    return time.perf_counter() - t


def _pg_conn(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))


def pg_save(url: str, cache: Path) -> None:
    with _pg_conn(url) as con, con.cursor() as cur:
        for table in ("usage_event", "usage_interval"):
            with (cache / f"{table}.copy").open("wb") as f, cur.copy(f"COPY {table} TO STDOUT") as cp:
                for chunk in cp:
                    f.write(chunk)


def pg_restore(url: str, cache: Path) -> None:
    with _pg_conn(url) as con:
        with con.cursor() as cur:
            for table in ("usage_event", "usage_interval"):
                with (cache / f"{table}.copy").open("rb") as f, cur.copy(f"COPY {table} FROM STDIN") as cp:
                    while chunk := f.read(1 << 20):
                        cp.write(chunk)
            cur.execute("SELECT setval(pg_get_serial_sequence('usage_event', 'id'), (SELECT MAX(id) FROM usage_event))")
        con.commit()
        con.autocommit = True
        con.execute("VACUUM ANALYZE")


def timed(fn, repeat: int = 2) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(url: str) -> dict[str, float]:
    engine = db.make_engine(url)
    price = Pricing(default=Decimal("0.10"))
    out: dict[str, float] = {}
    with session_scope(engine) as s:
        out["invoice, largest tenant (20% of ledger)"] = timed(
            lambda: invoices.invoice(s, price, tenant_id="tenant-000", month="2026-02")
        )
        out["invoice, typical tenant (0.8%)"] = timed(lambda: invoices.invoice(s, price, tenant_id="tenant-042", month="2026-02"))
        out["tenant chart, 30 days by day (largest)"] = timed(
            lambda: usage.usage(
                s,
                price,
                start=NOW - timedelta(days=30),
                end=NOW,
                group_by=(),
                bucket_seconds=units.DAY,
                tenant_id="tenant-000",
            )
        )

        def current_and_days() -> None:
            overview.overview(s, price, now=NOW, start=NOW - timedelta(days=14))

        def overview_page() -> None:  # what /admin computes
            current_and_days()
            catalog.physical_current(s, now=NOW)

        out["current usage, all tenants"] = timed(lambda: usage.current(s, price, now=NOW))
        out["overview without physical (current + 14 days)"] = timed(current_and_days)
        out["physical bytes, all tenants"] = timed(lambda: catalog.physical_current(s, now=NOW))
        out["overview page (all tenants: current + physical + 14 days)"] = timed(overview_page)
        cross_check(s)
    out["ledger write (1 event + derived rows, own transaction), ms per event"] = write_ms(engine)
    engine.dispose()
    return out


def write_ms(engine, n: int = 100) -> float:  # type: ignore[no-untyped-def]
    """The writers' cost: ``ledger.record`` of a commit and an end per new checkpoint, each event in
    its own transaction (what a commit/delete request pays), on the loaded tables. Milliseconds per
    event, median of 2n."""
    from weightstore.billing import ledger

    times = []
    for i in range(n):
        ck, at = f"bench-write-{i}", NOW - timedelta(hours=1 + i)
        for event, when in ((UsageEventKind.commit, at), (UsageEventKind.end, at + timedelta(minutes=30))):
            t = time.perf_counter()
            with session_scope(engine) as s:
                ledger.record(
                    s,
                    tenant_id=f"tenant-{i % 100:03d}",
                    run_id="bench-run",
                    checkpoint_id=ck,
                    kind="training",
                    event=event,
                    at=when,
                    size_bytes=10**9 + i,
                    expires_at=None,
                    recorded_at=when,
                )
            times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def cross_check(s) -> None:  # type: ignore[no-untyped-def]
    """The usage_day path (overview, current, daily usage) equals the interval-based one on this data,
    exactly, including windows whose ends are not day boundaries (untimed)."""
    fine = ["tenant_id", "kind"]
    for now in (NOW, NOW - timedelta(hours=7, seconds=13)):
        for start in (now - timedelta(days=14), now - timedelta(days=14, hours=5, seconds=3), now - timedelta(hours=3)):
            ws, we = units.epoch(start), units.epoch(now)
            by_days = aggregates.day_sums(s, ws=ws, we=we, tenant_id=None)
            by_intervals = aggregates.window_sums(
                s, fine, ws=ws, we=we, bucket_seconds=units.DAY, tenant_id=None, current_at_end=True
            )
            assert by_days == by_intervals, (now, start)
    print("cross-check: usage_day path == usage_interval path (6 windows, all tenants)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--skip-pg", action="store_true")
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--serve", help="(profiling) after loading PostgreSQL, write its URL to this file and wait")
    ap.add_argument("--json-out", type=Path, help="also write the timings as JSON here")
    ap.add_argument("--before", type=Path, help="JSON timings of the previous code (its --json-out), for the table")
    ap.add_argument("--before-label", default="before", help="what --before measured, for the text")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave results/billing.md alone")
    ap.add_argument("--cache", type=Path, help="keep/reuse loaded data here between runs")
    args = ap.parse_args()
    cache = args.cache / f"n{args.n}" if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    derived: dict[str, float] = {}
    migrated: dict[str, float] = {}
    catalog: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        if args.skip_sqlite:
            pass
        elif cache and (cache / "sqlite.db").exists():
            shutil.copyfile(cache / "sqlite.db", path)
            t = time.perf_counter()
            db.upgrade(f"sqlite:///{path}")  # migrations added since the cache was made
            migrated["SQLite"] = time.perf_counter() - t
            with sqlite3.connect(path) as con:
                con.execute("ANALYZE")
            print(f"sqlite: reused cached data, newer migrations in {migrated['SQLite']:.1f}s", flush=True)
        else:
            db.upgrade(f"sqlite:///{path}")
            t = time.perf_counter()
            load_sqlite(path, args.n)
            print(f"sqlite: loaded {args.n} intervals in {time.perf_counter() - t:.1f}s", flush=True)
            derived["SQLite"] = derive(f"sqlite:///{path}")
            print(f"sqlite: derived usage_interval in {derived['SQLite']:.1f}s", flush=True)
            if cache:
                with sqlite3.connect(path) as con:
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                shutil.copyfile(path, cache / "sqlite.db")
        if not args.skip_sqlite:
            catalog["SQLite"] = load_catalog(f"sqlite:///{path}")
            results["SQLite"] = measure(f"sqlite:///{path}")
            print(results["SQLite"], flush=True)
    if not args.skip_pg:
        from tests.support.localpg import LocalPostgres

        with LocalPostgres() as pg:
            url = pg.create_database("bench")  # type: ignore[attr-defined]
            if cache and (cache / "usage_interval.copy").exists():
                db.upgrade(url, CACHE_REVISION)  # the schema the cache was saved from
                pg_restore(url, cache)
                t = time.perf_counter()
                db.upgrade(url)  # migrations added since (0004 derives usage_day from usage_interval)
                migrated["PostgreSQL"] = time.perf_counter() - t
                print(f"postgresql: reused cached data, newer migrations in {migrated['PostgreSQL']:.1f}s", flush=True)
            else:
                db.upgrade(url)
                t = time.perf_counter()
                load_pg(url, args.n)
                print(f"postgresql: loaded {args.n} intervals in {time.perf_counter() - t:.1f}s", flush=True)
                derived["PostgreSQL"] = derive(url)
                print(f"postgresql: derived usage_interval in {derived['PostgreSQL']:.1f}s", flush=True)
                if cache:
                    pg_save(url, cache)
            catalog["PostgreSQL"] = load_catalog(url)
            if args.serve:
                print(f"postgresql: serving {url} until interrupted", flush=True)
                Path(args.serve).write_text(url)
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the cluster on `kill PID` too
                try:
                    while True:
                        time.sleep(3600)
                except (KeyboardInterrupt, SystemExit):
                    return
            results["PostgreSQL"] = measure(url)
            print(results["PostgreSQL"], flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": results, "catalog": catalog}, indent=1))
    before: dict[str, dict[str, float]] = json.loads(args.before.read_text())["results"] if args.before else {}
    names = list(next(iter(results.values())))
    backends = list(results)
    cat = ", ".join(f"{b} {n:,}" for b, n in catalog.items())
    lines = [
        f"# Billing latency, ledger of {args.n:,} checkpoint intervals",
        "",
        "Seconds, best of 2, one process on the shared 2-core dev machine (load average during the run: "
        f"{os.getloadavg()[0]:.1f}; other engineers' jobs, so absolute figures are inflated and noisy). "
        "Queries read the derived tables `usage_interval` (one row per checkpoint) and, since migration 0004, "
        "`usage_day` (per tenant, kind and UTC day), both maintained by the ledger writers. "
        f"*Before* = {args.before_label}, measured by this script in the same session against the "
        "same cached data. Overview = current usage + physical bytes + 14 daily buckets of all tenants; "
        f"the catalog holds checkpoints stored now with two files each, one blob shared per run ({cat}).",
        "",
        "| query | " + " | ".join(f"{b} before | {b} now | speed-up" for b in backends) + " |",
        "|---|" + "---|---|---|" * len(backends),
    ]
    for name in names:
        cells = []
        for b in backends:
            old = before.get(b, {}).get(name)
            now_s = results[b][name]
            cells += [f"{old:.3f}" if old else "-", f"{now_s:.3f}", f"{old / now_s:.1f}x" if old else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if migrated:
        lines += [
            "",
            "One-off, this run: migrations newer than the cache applied to the cached 1M-interval data "
            "(0004 creates `usage_day` and derives it from `usage_interval`, plus one index): "
            + ", ".join(f"{b} {migrated[b]:.1f} s" for b in migrated)
            + ".",
        ]
    if derived:
        lines += [
            "",
            "One-off: deriving `usage_interval` from the bulk-loaded ledger (`rebuild_intervals`, what "
            "migration 0002 runs on an existing ledger): " + ", ".join(f"{b} {derived[b]:.1f} s" for b in derived) + ".",
        ]
    if not args.no_write:
        out = Path(__file__).resolve().parent / "results" / "billing.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
