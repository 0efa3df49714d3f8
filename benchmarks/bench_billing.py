"""Billing latency over a large ledger, SQLite and PostgreSQL side by side.

Builds a ledger of N checkpoint intervals (default 1,000,000: a ``commit`` row each, an ``end`` row
for half of them, TTLs on a quarter) spread over 100 tenants and 90 days, bulk-inserted
(executemany on SQLite, COPY on PostgreSQL), derives ``usage_interval`` from it with
``intervals.rebuild_intervals`` (the same SQL the ledger writers run per checkpoint; a test asserts
the maintained table equals a rebuild), then times:

* ``invoice``: one month's invoice of the largest tenant and of a typical one;
* ``overview``: what the admin overview page computes (current usage of all tenants, physical
  bytes, 14 daily buckets of all tenants);
* ``usage 30d by day``: the tenant page's chart query for the largest tenant.

Writes ``benchmarks/results/billing.md``. Usage: ``python benchmarks/bench_billing.py [--n 1000000]``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from weightstore import db, intervals, metering
from weightstore.db import session_scope
from weightstore.metering import Pricing

NOW = datetime(2026, 3, 20, tzinfo=UTC)
START = NOW - timedelta(days=90)
# the same queries before usage_interval existed (one self-join of the ledger per query), measured with
# this script at 1,000,000 intervals on the same machine (commit e3ff8ef, benchmarks/results/billing.md)
BEFORE = {
    "SQLite": {"invoice, largest tenant (20% of ledger)": 11.352, "invoice, typical tenant (0.8%)": 0.358,
               "tenant chart, 30 days by day (largest)": 10.970, "overview page (all tenants: current + 14 days)": 42.429},
    "PostgreSQL": {"invoice, largest tenant (20% of ledger)": 2.099, "invoice, typical tenant (0.8%)": 0.082,
                   "tenant chart, 30 days by day (largest)": 3.155, "overview page (all tenants: current + 14 days)": 40.508},
}
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
        batch.append((tenant, run, ck, kind, ev, at.replace(tzinfo=None).strftime(fmt), size,
                      exp.replace(tzinfo=None).strftime(fmt) if exp else None, at.replace(tzinfo=None).strftime(fmt)))
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
            lambda: metering.invoice(s, price, tenant_id="tenant-000", month="2026-02"))
        out["invoice, typical tenant (0.8%)"] = timed(
            lambda: metering.invoice(s, price, tenant_id="tenant-042", month="2026-02"))
        out["tenant chart, 30 days by day (largest)"] = timed(
            lambda: metering.usage(s, price, start=NOW - timedelta(days=30), end=NOW, group_by=(),
                                   bucket_seconds=metering.DAY, tenant_id="tenant-000"))

        def overview() -> None:
            metering.current(s, price, now=NOW)
            metering.physical_current(s, now=NOW)
            metering.usage(s, price, start=NOW - timedelta(days=14), end=NOW, bucket_seconds=metering.DAY)

        out["overview page (all tenants: current + 14 days)"] = timed(overview)
    engine.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    derived: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        db.upgrade(f"sqlite:///{path}")
        t = time.perf_counter()
        load_sqlite(path, args.n)
        print(f"sqlite: loaded {args.n} intervals in {time.perf_counter() - t:.1f}s", flush=True)
        derived["SQLite"] = derive(f"sqlite:///{path}")
        print(f"sqlite: derived usage_interval in {derived['SQLite']:.1f}s", flush=True)
        results["SQLite"] = measure(f"sqlite:///{path}")
        print(results["SQLite"], flush=True)
    if not args.skip_pg:
        from weightstore.localpg import LocalPostgres

        with LocalPostgres() as pg:
            url = pg.create_database("bench")  # type: ignore[attr-defined]
            db.upgrade(url)
            t = time.perf_counter()
            load_pg(url, args.n)
            print(f"postgresql: loaded {args.n} intervals in {time.perf_counter() - t:.1f}s", flush=True)
            derived["PostgreSQL"] = derive(url)
            print(f"postgresql: derived usage_interval in {derived['PostgreSQL']:.1f}s", flush=True)
            results["PostgreSQL"] = measure(url)
            print(results["PostgreSQL"], flush=True)
    names = list(next(iter(results.values())))
    backends = list(results)
    lines = [f"# Billing latency, ledger of {args.n:,} checkpoint intervals", "",
             "Seconds, best of 2, one process on the shared 2-core dev machine. Queries read the derived "
             "`usage_interval` table (one row per checkpoint, maintained by the ledger writers); *before* = the "
             "same query regrouping the ledger with a self-join each time (previous run of this script at "
             "1,000,000 intervals, commit e3ff8ef). Overview = current usage + physical bytes of all tenants "
             "+ 14 daily buckets of all tenants.", "",
             "| query | " + " | ".join(f"{b} before | {b} now | speed-up" for b in backends) + " |",
             "|---|" + "---|---|---|" * len(backends)]
    for name in names:
        cells = []
        for b in backends:
            old = BEFORE.get(b, {}).get(name) if args.n == 1_000_000 else None
            now_s = results[b][name]
            cells += [f"{old:.3f}" if old else "-", f"{now_s:.3f}", f"{old / now_s:.0f}x" if old else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "One-off: deriving `usage_interval` from the bulk-loaded ledger (`rebuild_intervals`, what "
              "migration 0002 runs on an existing ledger): "
              + ", ".join(f"{b} {derived[b]:.1f} s" for b in backends) + "."]
    out = Path(__file__).resolve().parent / "results" / "billing.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
