"""SQL aggregates over the derived tables: exact byte-seconds per group (and bucket) in a window, and
what is stored at an instant. Integers only; prices and rows for callers are ``weightstore.billing.usage``.

Everything aggregates in SQL (SQLite and PostgreSQL alike) over ``usage_interval`` and ``usage_day``
(``weightstore.billing.intervals``: maintained by the ledger writers, rebuildable from the ledger),
so the database returns O(groups x buckets) rows, never one row per checkpoint
(docs/design-billing.md §4):

* ``day_sums``: per (tenant, kind) by UTC day, over a whole window or at an instant, from
  ``usage_day`` (whole days as prefix sums) plus the edges of at most two partial days read from
  ``usage_interval``: O(tenants x kinds x days), whatever the number of checkpoints;
* ``window_sums``: any grouping (``run_id`` too) and any bucket length, from the intervals
  overlapping the window: a window total is one range-overlap sum; bucketed series return per
  (group, bucket) only the sums over interval starts and stops falling in each bucket and run the
  prefix sums here;
* ``stored_at``: count and bytes per group stored at an instant (the ``run_id`` groupings).

SQLite's ``sum`` raises on 64-bit overflow (and its products turn float), so there byte-seconds are
summed in two parts (``SPLIT``) and recombined in Python; PostgreSQL multiplies in ``bigint`` (an
overflow raises and the split form is used instead).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session

from weightstore.billing.billable import billed_only_sql
from weightstore.billing.units import DAY, SPLIT

ByteSeconds = dict[tuple[Any, ...], int]
"""Byte-seconds per fine group key (the grouping columns' values, then the bucket number if bucketed)."""
Stored = dict[tuple[Any, ...], list[int]]
"""``[checkpoint count, bytes]`` stored at an instant, per fine group key."""
DayMode = Literal["days", "total", "state"]
TenantKind = tuple[str, str]


def tune(session: Session) -> None:
    """PostgreSQL, for this transaction: JIT off (it spent ~0.5-1 s compiling these cheap, scan-bound
    aggregates); ``work_mem`` 64 MB, because the planner cannot estimate how few (group, bucket)
    rows a ``GROUP BY`` on computed buckets yields and otherwise sorts ~10^5 rows instead of hashing."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SET LOCAL jit = off"))
        session.execute(sa.text("SET LOCAL work_mem = '64MB'"))


def _tenant_filter(params: dict[str, Any], tenant_id: str | None) -> str:
    """The SQL condition (``AND ...``) restricting to one tenant (binds ``:tenant``) or, with no tenant
    named, to the billed tenants (``billable.billed_only_sql``: operator tenants are never summed)."""
    if tenant_id is None:
        return billed_only_sql(params)
    params["tenant"] = tenant_id
    return " AND tenant_id = :tenant"


# --- per (tenant, kind) by day: usage_day plus the partial days ------------------------------------
@dataclass
class _DayEdges:
    """What the ``day_sums`` statement returns, per (tenant, kind): net edge sums
    ``[count, bytes, size x offset]`` (+ for starts, - for stops)."""

    stored_at_t0: dict[TenantKind, list[int]] = field(default_factory=dict)
    """``[count, bytes]`` stored at ``T0`` (the sum of the edges of all days before it)."""
    whole_days: dict[TenantKind, dict[int, list[int]]] = field(default_factory=lambda: defaultdict(dict))
    """Per day in ``[T0, day(we))``, from usage_day (offsets from the day's start)."""
    parts: dict[int, dict[TenantKind, list[int]]] = field(default_factory=lambda: {0: {}, 1: {}})
    """Part 0: edges in ``[T0, ws)``; part 1: edges in ``[day(we), we]`` (offsets from the part's start)."""


def _usage_day_sql(tenant_where: str) -> list[str]:
    """usage_day: one row per group for the days before T0 (bytes stored at T0; byte sums split at
    10^6 so SQLite's 64-bit sum cannot overflow), one per group and day in [T0, day(we))."""
    return [
        f"""SELECT tenant_id, kind, -1, SUM(starts) - SUM(stops), SUM(start_bytes / {SPLIT}) - SUM(stop_bytes / {SPLIT}),
    SUM(start_bytes % {SPLIT}) - SUM(stop_bytes % {SPLIT}), 0, 0
  FROM usage_day WHERE day < :ka{tenant_where} GROUP BY tenant_id, kind""",
        f"""SELECT tenant_id, kind, day, starts - stops, 0, start_bytes - stop_bytes,
    start_off_hi - stop_off_hi, start_off_lo - stop_off_lo
  FROM usage_day WHERE day >= :ka AND day < :kn{tenant_where}""",
    ]


def _partial_day_sql(label: int, tenant_where: str, sqlite: bool) -> list[str]:
    """usage_interval: the edges of a part ``[:lo<label>, :hi<label>)`` of one day, per group, offsets
    from the part's start, tagged ``-2 - label``. SQLite is told the index: its planner chose a
    skip-scan of ix_usage_interval_cover for the stop range (0.06 s instead of ~1 ms at 1M intervals)."""
    out = []
    for col, sign, index in (("start_s", "", "start"), ("stop_s", "-", "stop")):
        off = f"({col} - :lo{label})"
        hint = f" INDEXED BY ix_usage_interval_{index}_cover" if sqlite else ""
        out.append(f"""SELECT tenant_id, kind, {-2 - label}, {sign}COUNT(*), 0, {sign}SUM(size_bytes),
    {sign}SUM(size_bytes / {SPLIT} * {off}), {sign}SUM(size_bytes % {SPLIT} * {off})
  FROM usage_interval{hint} WHERE {col} >= :lo{label} AND {col} < :hi{label}{tenant_where} GROUP BY tenant_id, kind""")
    return out


def _read_day_edges(rows: Sequence[Sequence[Any]]) -> _DayEdges:
    """Sort the statement's rows by tag: -1 history before T0, >= 0 a whole day, -2/-3 parts 0/1."""
    edges = _DayEdges()
    for row in rows:
        key, tag = (row[0], row[1]), int(row[2])
        n, b_hi, b_lo, w_hi, w_lo = (int(x or 0) for x in row[3:8])
        sums = [n, b_hi * SPLIT + b_lo, w_hi * SPLIT + w_lo]
        if tag == -1:
            edges.stored_at_t0[key] = sums[:2]
        elif tag >= 0:
            edges.whole_days[key][tag] = sums
        else:
            slot = edges.parts[-2 - tag].setdefault(key, [0, 0, 0])
            for i in range(3):
                slot[i] += sums[i]
    return edges


def _stored_at_end(edges: _DayEdges) -> Stored:
    """``[count, bytes]`` per (tenant, kind) stored at ``we``: all edges up to and including ``we``."""
    zero = [0, 0, 0]
    hist, days, end_part = edges.stored_at_t0, edges.whole_days, edges.parts[1]
    cur: Stored = {}
    for key in set(hist) | set(days) | set(end_part):
        whole = days.get(key, {}).values()
        n = hist.get(key, zero)[0] + sum(x[0] for x in whole) + end_part.get(key, zero)[0]
        if n:
            b = hist.get(key, zero)[1] + sum(x[1] for x in whole) + end_part.get(key, zero)[1]
            cur[key] = [n, b]
    return cur


def _day_byte_seconds(edges: _DayEdges, *, ws: int, we: int, per_day: bool) -> ByteSeconds:
    """``F(t) = (S(T0) + NB(t)) x (t - T0) - W(t)`` at the window's ends (and day boundaries if
    ``per_day``): byte-seconds per (tenant, kind[, day]) in ``[ws, we)``. Without ``per_day`` it sums
    only the day rows there are (no loop over empty days)."""
    zero = [0, 0, 0]
    k_a, k_n = ws // DAY, we // DAY
    t0, tn = k_a * DAY, k_n * DAY
    hist, days, parts = edges.stored_at_t0, edges.whole_days, edges.parts
    acc: ByteSeconds = {}
    last = (we - 1) // DAY
    for key in set(hist) | set(days) | set(parts[0]) | set(parts[1]):
        s0 = hist.get(key, zero)[1]
        by_day = days.get(key, {})
        p0, p1 = parts[0].get(key, zero), parts[1].get(key, zero)
        f_prev = (s0 + p0[1]) * (ws - t0) - p0[2]  # F(ws)
        nb = w = 0  # net bytes and size x (x - T0) of the whole days' edges so far
        if not per_day:  # F(we) - F(ws)
            for d, (_, b, w_d) in by_day.items():
                nb += b
                w += w_d + b * (d * DAY - t0)
            f_end = (s0 + nb + p1[1]) * (we - t0) - (w + p1[2] + p1[1] * (tn - t0))
            if f_end != f_prev:
                acc[key] = f_end - f_prev
            continue
        for d in range(k_a, last + 1):
            if d < k_n:
                _, b, w_d = by_day.get(d, zero)
                nb += b
                w += w_d + b * (d * DAY - t0)
                f_end = (s0 + nb) * ((d + 1) * DAY - t0) - w
            else:  # we's own day: its edges in [day(we), we] from usage_interval
                f_end = (s0 + nb + p1[1]) * (we - t0) - (w + p1[2] + p1[1] * (tn - t0))
            if f_end != f_prev:
                acc[(*key, d)] = f_end - f_prev
            f_prev = f_end
    return acc


def day_sums(
    session: Session,
    *,
    ws: int,
    we: int,
    tenant_id: str | None,
    mode: DayMode = "days",
) -> tuple[ByteSeconds, Stored]:
    """Byte-seconds per (tenant, kind, UTC day) in ``[ws, we)`` and ``[count, bytes]`` per (tenant,
    kind) stored at ``we`` (what ``current(now=we)`` returns), from ``usage_day`` plus the edges of
    the partial days read from ``usage_interval`` (docs/design-billing.md §4): O(tenants x kinds x
    days) rows, whatever the number of intervals, from ONE statement. ``mode``: ``"days"`` (per day),
    ``"total"`` (per (tenant, kind) over the window, O(rows) however long it is), ``"state"`` (only
    the state at ``we``).

    With ``T0`` = the start of ``ws``'s day, ``F(t) = C(t) - C(T0)`` (byte-seconds stored in
    ``[T0, t)``) is ``(S(T0) + NB(t)) x (t - T0) - W(t)``, where ``S(T0)`` is the bytes stored at
    ``T0`` (sum of the edges of all earlier days) and ``NB(t)``, ``W(t)`` the sums of ``±size`` and
    ``±size x (x - T0)`` over the edges ``x`` in ``[T0, t)`` (+ for starts, - for stops). Whole days
    ``[T0, day(we))`` come from usage_day; the edges in ``[T0, ws)`` (for ``F(ws)``) and in
    ``[day(we), we]`` (for ``F(we)`` and the state at ``we``) from usage_interval's start/stop indexes
    (rows of ``we``'s day in usage_day may hold later edges: planned expiries)."""
    tune(session)
    if mode == "state":
        ws = we
    k_a, k_n = ws // DAY, we // DAY
    t0, tn = k_a * DAY, k_n * DAY
    params: dict[str, Any] = {"ka": k_a, "kn": k_n}
    tenant_where = _tenant_filter(params, tenant_id)
    sqlite = session.get_bind().dialect.name == "sqlite"
    sql = _usage_day_sql(tenant_where)
    if mode != "state" and ws > t0:
        params["lo0"], params["hi0"] = t0, ws
        sql += _partial_day_sql(0, tenant_where, sqlite)  # edges in [T0, ws): F(ws)
    # edges in [day(we), we], `we` included: the state at `we` counts a start at `we`
    params["lo1"], params["hi1"] = tn, we + 1
    sql += _partial_day_sql(1, tenant_where, sqlite)
    edges = _read_day_edges(session.execute(sa.text("\nUNION ALL\n".join(sql)), params).all())
    cur = _stored_at_end(edges)
    if mode == "state":
        return {}, cur
    return _day_byte_seconds(edges, ws=ws, we=we, per_day=mode == "days"), cur


# --- any grouping and bucket: the intervals overlapping the window ---------------------------------
def _run_exact(session: Session, make: Callable[[bool], str], params: dict[str, Any]) -> list[Sequence[Any]]:
    """Run the statement ``make(split)`` builds: split on SQLite; on PostgreSQL unsplit first, inside a
    savepoint, because a bigint product above 2^63 (huge size x long span) raises: then split."""
    if session.get_bind().dialect.name != "postgresql":
        return list(session.execute(sa.text(make(True)), params).all())
    try:
        with session.begin_nested():
            return list(session.execute(sa.text(make(False)), params).all())
    except sa.exc.DataError:
        return list(session.execute(sa.text(make(True)), params).all())


def _mul_sums(split: bool, *factors: str) -> str:
    """Two columns per factor f, (hi, lo) with SUM(size * f) = hi * 10^6 + lo. Split (SQLite; the
    PostgreSQL fallback): its products silently turn float on overflow and its sum raises. Else
    (PostgreSQL) bigint products (an overflow raises, never wraps) and SUM(bigint) (exact)."""
    if split:
        return ", ".join(f"SUM(size_bytes / {SPLIT} * {f}), SUM(size_bytes % {SPLIT} * {f})" for f in factors)
    return ", ".join(f"0, SUM(size_bytes * {f})" for f in factors)


def _window_total_sql(g: str, tenant_where: str, split: bool) -> str:
    """One window, no buckets: one pass, grouped in index order (a tenant's rows stream, no sort)."""
    span = "((CASE WHEN stop_s < :we THEN stop_s ELSE :we END) - (CASE WHEN start_s > :ws THEN start_s ELSE :ws END))"
    return (
        f"SELECT {g}, {_mul_sums(split, span)} FROM usage_interval "
        f"WHERE start_s < :we AND stop_s > :ws AND stop_s > start_s{tenant_where} GROUP BY {g}"
    )


def _halves_sql(g: str, bucket: int, start_le: str, tenant_where: str, split: bool) -> str:
    """Two halves, disjoint, each a range of the stop_s index and plain column arithmetic (no clipping
    CASE per row): A = still stored at `we` (stop_s > we: all current, clipped stop = we);
    B = stopping inside the window (ws < stop_s <= we). The start bucket is -1 for a start at or
    before ws (clipped to ws: weight 0); offsets inside a bucket are `x % B` (< B: small products)."""
    B = bucket
    sbx = f"CASE WHEN start_s > :ws THEN start_s / {B} ELSE -1 END"
    s_off, e_off = f"(start_s % {B})", f"(stop_s % {B})"
    return f"""SELECT {g}, {sbx} AS sb, -1 AS eb, COUNT(*), SUM(size_bytes), SUM(size_bytes),
    {_mul_sums(split, s_off)}, 0, 0
  FROM usage_interval WHERE stop_s > :we AND start_s {start_le} :we{tenant_where} GROUP BY {g}, {sbx}
UNION ALL
SELECT {g}, {sbx} AS sb, stop_s / {B} AS eb, 0, 0, SUM(size_bytes), {_mul_sums(split, s_off, e_off)}
  FROM usage_interval WHERE stop_s > :ws AND stop_s <= :we AND stop_s > start_s{tenant_where}
  GROUP BY {g}, {sbx}, stop_s / {B}"""


def _classes_sql(g: str, bucket: int, start_le: str, tenant_where: str, split: bool) -> str:
    """All tenants (both backends) and SQLite: the big class (spanning the whole window) groups by
    (tenant, kind[, run]) only -- few groups the planners estimate right, so PostgreSQL runs it as a
    parallel partial aggregate and SQLite streams it from ix_usage_interval_cover without a temp
    B-tree; the rest (a start or stop inside the window) clips with CASEs."""
    B = bucket
    s_x = "CASE WHEN start_s > :ws THEN start_s ELSE :ws END"
    e_x = "CASE WHEN stop_s < :we THEN stop_s ELSE :we END"
    s_o, e_o = f"(({s_x}) - ({s_x}) / {B} * {B})", f"(({e_x}) - ({e_x}) / {B} * {B})"
    now_n = "SUM(CASE WHEN stop_s > :we THEN 1 ELSE 0 END)"
    now_b = "SUM(CASE WHEN stop_s > :we THEN size_bytes ELSE 0 END)"
    return f"""SELECT {g}, -1 AS sb, -1 AS eb, {now_n}, {now_b}, SUM(size_bytes), 0, 0, 0, 0
  FROM usage_interval WHERE stop_s >= :we AND start_s <= :ws{tenant_where} GROUP BY {g}
UNION ALL
SELECT {g}, ({s_x}) / {B} AS sb, ({e_x}) / {B} AS eb, {now_n}, {now_b}, SUM(size_bytes), {_mul_sums(split, s_o, e_o)}
  FROM usage_interval
  WHERE ((start_s > :ws AND start_s {start_le} :we) OR (stop_s > :ws AND stop_s < :we)) AND stop_s > start_s{tenant_where}
  GROUP BY {g}, sb, eb"""


BucketEdges = dict[tuple[Any, ...], dict[int, list[int]]]
"""Per group and bucket: [sum of sizes starting (+) / stopping (-), sum of size x (instant - ws)]."""


def _bucket_edges(rows: Sequence[Sequence[Any]], n: int, *, ws: int, we: int, bucket: int) -> tuple[BucketEdges, Stored]:
    """Turn the halves'/classes' rows into per-bucket edge sums, and the state at ``we`` they carry."""
    B = bucket
    cur: Stored = {}
    edges: BucketEdges = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    first = ws // B
    for row in rows:
        key, b_s, b_e = tuple(row[:n]), int(row[n]), int(row[n + 1])
        now_n, now_b, size, s_hi, s_lo, e_hi, e_lo = (int(x or 0) for x in row[n + 2 : n + 9])
        if now_n:  # stored at `we`
            slot = cur.setdefault(key, [0, 0])
            slot[0] += now_n
            slot[1] += now_b
        if b_s < 0:  # started at or before ws: clipped to ws
            b_s, s_w = first, 0
        else:
            s_w = s_hi * SPLIT + s_lo + size * (b_s * B - ws)
        if b_e < 0:  # half A: clipped to we
            b_e, e_w = we // B, size * (we - ws)
        else:
            e_w = e_hi * SPLIT + e_lo + size * (b_e * B - ws)
        edge = edges[key][b_s]
        edge[0] += size
        edge[1] += s_w
        edge = edges[key][b_e]
        edge[0] -= size
        edge[1] -= e_w
    return edges, cur


def _bucket_prefix_sums(edges: BucketEdges, *, ws: int, we: int, bucket: int) -> ByteSeconds:
    """Byte-seconds stored before instant t: C(t) = sum_{s<t} size*(t-s) - sum_{e<t} size*(t-e), so
    bucket b's usage is C(its end) - C(its start), exactly; prefix sums over the buckets."""
    B = bucket
    acc: ByteSeconds = defaultdict(int)
    first, last = ws // B, (we - 1) // B
    for key, by_bucket in edges.items():
        size_sum = weighted = 0  # over edges before the current instant; weighted = sum size*(x - ws)
        before = 0  # C(start of the current bucket)
        for b in range(first, last + 1):
            d_size, d_weighted = by_bucket.get(b, (0, 0))
            size_sum += d_size
            weighted += d_weighted
            after = (min(we, (b + 1) * B) - ws) * size_sum - weighted  # C(end of bucket b)
            if after != before:
                acc[(*key, b)] += after - before
            before = after
    return {k: v for k, v in acc.items() if v}


def window_sums(
    session: Session,
    fine: list[str],
    *,
    ws: int,
    we: int,
    bucket_seconds: int | None,
    tenant_id: str | None,
    current_at_end: bool = False,
) -> tuple[ByteSeconds, Stored]:
    """Byte-seconds per ``fine`` group (and bucket) in ``[ws, we)``, from ONE statement.

    Without buckets: one pass, ``SUM(size * (clipped stop - clipped start))``. With buckets, the
    overlapping intervals are read by two disjoint halves of one ``UNION ALL`` (docs/design-billing.md
    §4): *classes* (spanning the window / edged) for all tenants and on SQLite, *halves on stop_s*
    (A: ``stop_s > we``, B: stopping inside) for one tenant on PostgreSQL. Each returns per (group,
    start bucket[, stop bucket]) the sums of size and of size times the offset of the start/stop
    inside its bucket (offsets < bucket length, so the products stay small); a start at or before
    ``ws`` gets bucket -1 (clipped to ``ws``), a stop at or after ``we`` stop bucket -1 (clipped to ``we``).

    With ``current_at_end`` the same statement also returns, per group, ``[count, bytes]`` of the
    checkpoints still stored at ``we`` (what ``current(now=we)`` returns)."""
    tune(session)
    g = ", ".join(fine)
    n = len(fine)
    params: dict[str, Any] = {"ws": ws, "we": we}
    tenant_where = _tenant_filter(params, tenant_id)
    if bucket_seconds is None:
        acc: ByteSeconds = {}
        for row in _run_exact(session, partial(_window_total_sql, g, tenant_where), params):
            acc[tuple(row[:n])] = int(row[n] or 0) * SPLIT + int(row[n + 1] or 0)
        return {k: v for k, v in acc.items() if v}, {}
    # a checkpoint starting exactly at `we` is current at `we` but stores nothing inside the window
    start_le = "<=" if current_at_end else "<"
    B = int(bucket_seconds)
    # measured at 1,000,000 intervals (docs/design-billing.md §4): halves A/B win for one tenant on
    # PostgreSQL (0.64 -> 0.24 s, tenant chart); the classes win for all tenants on both backends
    # (PostgreSQL overview 4.9 -> 2.2 s) and for everything on SQLite (tenant chart 0.79 -> 0.26 s)
    halves = tenant_id is not None and session.get_bind().dialect.name == "postgresql"
    make = partial(_halves_sql if halves else _classes_sql, g, B, start_le, tenant_where)
    edges, cur = _bucket_edges(_run_exact(session, make, params), n, ws=ws, we=we, bucket=B)
    return _bucket_prefix_sums(edges, ws=ws, we=we, bucket=B), cur


def stored_at(session: Session, fine: list[str], *, at: int, tenant_id: str | None) -> Stored:
    """``[count, bytes]`` per ``fine`` group of the checkpoints storing bytes at ``at`` (epoch seconds),
    from the intervals (any grouping; ``day_sums(mode="state")`` is the per (tenant, kind) path)."""
    g = ", ".join(fine)
    tune(session)
    params: dict[str, Any] = {"now": at}
    tenant_where = _tenant_filter(params, tenant_id)
    sql = (
        f"SELECT {g}, COUNT(*), SUM(size_bytes) FROM usage_interval "
        f"WHERE start_s <= :now AND stop_s > :now{tenant_where} GROUP BY {g}"
    )
    return {tuple(row[: len(fine)]): [int(row[-2]), int(row[-1] or 0)] for row in session.execute(sa.text(sql), params)}
