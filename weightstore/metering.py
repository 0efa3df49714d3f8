"""Storage metering: usage and cost as a pure function of the append-only ledger (``usage_event``).

What is measured
----------------
A checkpoint stores ``size_bytes`` (its *logical* size) from its ``commit`` event until the earliest
of (a) its first ``end`` event not cancelled by a later ``restore`` and (b) its effective
``expires_at`` (the value carried by its latest ledger row). So an expired checkpoint stops accruing
at ``expires_at`` even before the collector writes its ``end``. A ``restore`` cancels earlier
``end`` rows: the bytes were kept all along, so a restored checkpoint is billed without a gap.

Units and rounding (the one rule)
---------------------------------
* Time is measured in whole seconds since the Unix epoch (each boundary floored to the second).
* Usage is an exact integer of **byte-seconds**; it is additive: the byte-seconds of daily buckets
  sum exactly to the window's, and those of tenants sum exactly to the grand total.
* GB = 10**9 bytes; 1 GB-month = 720 GB-hours. Exact cost of a line =
  ``byte_seconds * rate / (10**9 * 720 * 3600)`` as a ``Decimal``.
* Money is rounded **once per reported line**, half-even to the cent; a total is the **sum of its
  rounded lines** (so an invoice always adds up). Costs of finer rows are summed exactly before the
  line is rounded.

Everything aggregates in SQL (SQLite and PostgreSQL alike) over ``usage_interval``, the derived
table holding each checkpoint's interval (``weightstore.intervals``: maintained by the ledger
writers, rebuildable from the ledger). A window total is one range-overlap sum; bucketed series
return per (group, bucket) only the sums over interval starts and stops falling in each bucket and
run the prefix sums here, so the database returns O(groups × buckets) rows, never one row per
checkpoint; the admin overview's current usage and daily buckets come from one statement
(``overview``). Views per (tenant, kind) by day or at an instant (overview, ``current()``, daily or
whole-window ``usage()`` without ``run_id``) read the second derived table ``usage_day`` instead
(``_day_sums``: whole days as prefix sums, partial days from ``usage_interval``), so they cost
O(tenants x kinds x days), not O(checkpoints). SQLite's ``sum`` raises on 64-bit overflow (and its products turn float), so there
byte-seconds are summed in two parts (megabytes and the remainder) and recombined in Python;
PostgreSQL multiplies in ``bigint`` (an overflow raises and the split form is used instead).
"""

from __future__ import annotations

import calendar
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from weightstore.errors import InvalidRequest
from weightstore.models import Tenant
from weightstore.settings import Settings

GB = 10**9
HOURS_PER_MONTH = 720  # Tinker's projections: one GB-month = 720 GB-hours
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
BYTE_SECONDS_PER_GB_MONTH = GB * SECONDS_PER_MONTH
DAY = 86400
HOUR = 3600
CENT = Decimal("0.01")
_SPLIT = 1_000_000  # byte-seconds are summed as (bytes // 1e6) and (bytes % 1e6) parts: no 64-bit overflow

GROUPS = ("tenant_id", "run_id", "kind")
"""Columns usage can be grouped by (any subset); buckets (day/hour) come on top."""


def round_cents(value: Decimal | Fraction | int) -> Decimal:
    """Half-even to the cent, exactly (costs are kept as ``Fraction`` until they are rounded)."""
    if isinstance(value, Decimal):
        return value.quantize(CENT, rounding=ROUND_HALF_EVEN)
    cents = round(Fraction(value) * 100)  # Fraction.__round__ is exact and rounds half to even
    return (Decimal(cents) / 100).quantize(CENT)


def epoch(dt: datetime) -> int:
    """Whole seconds since the epoch (floored), the ledger's unit of time."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() // 1)


def from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def month_window(month: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` → [first instant, first instant of next month) in UTC."""
    try:
        year, mon = (int(x) for x in month.split("-"))
        start = datetime(year, mon, 1, tzinfo=UTC)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"month must look like YYYY-MM, got {month!r}") from exc
    days = calendar.monthrange(year, mon)[1]
    return start, start + timedelta(days=days)


# --- pricing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pricing:
    """USD per GB-month. Precedence: tenant override, then per-kind price, then the default."""

    default: Decimal
    per_kind: dict[str, Decimal] = field(default_factory=dict)
    per_tenant: dict[str, Decimal] = field(default_factory=dict)

    def rate(self, tenant_id: str | None, kind: str | None) -> Decimal:
        if tenant_id is not None and tenant_id in self.per_tenant:
            return self.per_tenant[tenant_id]
        if kind is not None and kind in self.per_kind:
            return self.per_kind[kind]
        return self.default

    def cost(self, byte_seconds: int, tenant_id: str | None, kind: str | None) -> Fraction:
        """Exact (unrounded) cost of ``byte_seconds``: a ``Fraction``, so sums of costs stay exact."""
        return Fraction(byte_seconds) * Fraction(self.rate(tenant_id, kind)) / BYTE_SECONDS_PER_GB_MONTH


def _dec(x: float) -> Decimal:
    return Decimal(str(x))  # 0.1 → Decimal("0.1"), not the binary float's expansion


def pricing(session: Session, settings: Settings) -> Pricing:
    overrides = session.execute(
        sa.select(Tenant.id, Tenant.price_per_gb_month_usd).where(Tenant.price_per_gb_month_usd.is_not(None))  # type: ignore[call-overload]
    ).all()  # type: ignore[union-attr]
    return Pricing(
        default=_dec(settings.price_per_gb_month_usd),
        per_kind={k: _dec(v) for k, v in settings.price_per_kind_usd.items()},
        per_tenant={t: _dec(p) for t, p in overrides},
    )


# --- SQL ---------------------------------------------------------------------------------------
def _overlap_where(tenant_filter: bool) -> str:
    """``usage_interval`` rows billing something inside ``[:ws, :we)`` (zero-length ones never do)."""
    where = "start_s < :we AND stop_s > :ws AND stop_s > start_s"
    return where + (" AND tenant_id = :tenant" if tenant_filter else "")


def _tune(session: Session) -> None:
    """PostgreSQL, for this transaction: JIT off (it spent ~0.5-1 s compiling these cheap, scan-bound
    aggregates); ``work_mem`` 64 MB, because the planner cannot estimate how few (group, bucket)
    rows a ``GROUP BY`` on computed buckets yields and otherwise sorts ~10^5 rows instead of hashing."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SET LOCAL jit = off"))
        session.execute(sa.text("SET LOCAL work_mem = '64MB'"))


def _fine(cols: Sequence[str]) -> list[str]:
    """SQL grouping columns: the requested ones plus (tenant, kind) that the price depends on, in the
    order of the ``ix_usage_interval_cover`` index, so a tenant's rows aggregate as they are read."""
    return [c for c in ("tenant_id", "kind", "run_id") if c in cols or c in ("tenant_id", "kind")]


def _check_groups(group_by: Sequence[str]) -> list[str]:
    cols = list(dict.fromkeys(group_by))
    bad = [g for g in cols if g not in GROUPS]
    if bad:
        raise InvalidRequest(f"cannot group by {bad}; choose from {list(GROUPS)}")
    return cols


# --- usage over a window ------------------------------------------------------------------------
@dataclass(frozen=True)
class UsageRow:
    """Usage of one group (and bucket) in a window; ``cost_usd`` exact, ``cost_rounded_usd`` per the rule."""

    key: dict[str, Any]
    byte_seconds: int
    cost_exact_usd: Fraction

    @property
    def gb_hours(self) -> Decimal:
        return Decimal(self.byte_seconds) / (GB * 3600)

    @property
    def cost_usd(self) -> Decimal:
        return round_cents(self.cost_exact_usd)

    @property
    def average_bytes(self) -> Decimal:
        return Decimal(self.byte_seconds)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.key)
        out.update(byte_seconds=self.byte_seconds, gb_hours=float(round(self.gb_hours, 6)), cost_usd=str(self.cost_usd))
        return out


def _bucket_label(b: int, bucket_seconds: int) -> str:
    dt = from_epoch(b * bucket_seconds)
    return dt.date().isoformat() if bucket_seconds == DAY else dt.isoformat()


def usage(
    session: Session,
    pricing_: Pricing,
    *,
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = ("tenant_id",),
    bucket_seconds: int | None = None,
    tenant_id: str | None = None,
) -> list[UsageRow]:
    """Usage and exact cost in ``[start, end)`` per group (and per UTC bucket if ``bucket_seconds``).

    Cost depends on (tenant, kind), so SQL always groups by both; rows are merged to ``group_by``
    here (summing exact costs), which is O(result rows), not O(checkpoints).
    """
    cols = _check_groups(group_by)
    ws, we = epoch(start), epoch(end)
    if we <= ws:
        raise InvalidRequest("the window must end after it starts")
    if bucket_seconds is not None and (we - ws) // bucket_seconds > 24 * 400:
        raise InvalidRequest("too many buckets for this window")
    fine = _fine(cols)
    if "run_id" not in fine and bucket_seconds in (None, DAY):
        # per (tenant, kind): whole days from usage_day, partial days from usage_interval (§4)
        acc, _ = _day_sums(session, ws=ws, we=we, tenant_id=tenant_id, mode="days" if bucket_seconds else "total")
    else:
        acc, _ = _window_sums(session, fine, ws=ws, we=we, bucket_seconds=bucket_seconds, tenant_id=tenant_id)
    return _usage_rows(pricing_, acc, fine, cols, bucket_seconds)


def _day_sums(
    session: Session,
    *,
    ws: int,
    we: int,
    tenant_id: str | None,
    mode: str = "days",
) -> tuple[dict[tuple[Any, ...], int], dict[tuple[Any, ...], list[int]]]:
    """Byte-seconds per (tenant, kind, UTC day) in ``[ws, we)`` and ``[count, bytes]`` per (tenant,
    kind) stored at ``we`` (what ``current(now=we)`` returns), from ``usage_day`` plus the edges of
    the partial days read from ``usage_interval`` (docs/design-billing.md §4): O(tenants x kinds x
    days) rows, whatever the number of intervals. ``mode``: ``"days"`` (per day), ``"total"`` (per
    (tenant, kind) over the window, O(rows) however long it is), ``"state"`` (only the state at ``we``).

    With ``T0`` = the start of ``ws``'s day, ``F(t) = C(t) - C(T0)`` (byte-seconds stored in
    ``[T0, t)``) is ``(S(T0) + NB(t)) x (t - T0) - W(t)``, where ``S(T0)`` is the bytes stored at
    ``T0`` (sum of the edges of all earlier days) and ``NB(t)``, ``W(t)`` the sums of ``±size`` and
    ``±size x (x - T0)`` over the edges ``x`` in ``[T0, t)`` (+ for starts, - for stops). Whole days
    ``[T0, day(we))`` come from usage_day; the edges in ``[T0, ws)`` (for ``F(ws)``) and in
    ``[day(we), we]`` (for ``F(we)`` and the state at ``we``) from usage_interval's start/stop indexes
    (rows of ``we``'s day in usage_day may hold later edges: planned expiries)."""
    _tune(session)
    if mode == "state":
        ws = we
    k_a, k_n = ws // DAY, we // DAY
    t0, tn = k_a * DAY, k_n * DAY
    params: dict[str, Any] = {"ka": k_a, "kn": k_n}
    t_where = ""
    if tenant_id is not None:
        t_where = " AND tenant_id = :tenant"
        params["tenant"] = tenant_id
    # usage_day: one row per group for the days before T0 (bytes stored at T0; byte sums split at
    # 10^6 so SQLite's 64-bit sum cannot overflow), one per group and day in [T0, day(we))
    sql = [
        f"""SELECT tenant_id, kind, -1, SUM(starts) - SUM(stops), SUM(start_bytes / {_SPLIT}) - SUM(stop_bytes / {_SPLIT}),
    SUM(start_bytes % {_SPLIT}) - SUM(stop_bytes % {_SPLIT}), 0, 0
  FROM usage_day WHERE day < :ka{t_where} GROUP BY tenant_id, kind""",
        f"""SELECT tenant_id, kind, day, starts - stops, 0, start_bytes - stop_bytes,
    start_off_hi - stop_off_hi, start_off_lo - stop_off_lo
  FROM usage_day WHERE day >= :ka AND day < :kn{t_where}""",
    ]

    # usage_interval: the edges of a part of one day, per group, offsets from the part's start. SQLite
    # is told the index: its planner chose a skip-scan of ix_usage_interval_cover for the stop range
    # (0.06 s instead of ~1 ms at 1M intervals)
    sqlite = session.get_bind().dialect.name == "sqlite"

    def part(label: int, lo: int, hi: int) -> None:
        params[f"lo{label}"], params[f"hi{label}"] = lo, hi
        for col, sign, index in (("start_s", "", "start"), ("stop_s", "-", "stop")):
            off = f"({col} - :lo{label})"
            hint = f" INDEXED BY ix_usage_interval_{index}_cover" if sqlite else ""
            sql.append(f"""SELECT tenant_id, kind, {-2 - label}, {sign}COUNT(*), 0, {sign}SUM(size_bytes),
    {sign}SUM(size_bytes / {_SPLIT} * {off}), {sign}SUM(size_bytes % {_SPLIT} * {off})
  FROM usage_interval{hint} WHERE {col} >= :lo{label} AND {col} < :hi{label}{t_where} GROUP BY tenant_id, kind""")

    if mode != "state" and ws > t0:
        part(0, t0, ws)  # edges in [T0, ws): F(ws)
    part(1, tn, we + 1)  # edges in [day(we), we], `we` included: the state at `we` counts a start at `we`
    hist: dict[tuple[str, str], list[int]] = {}  # [count, bytes] stored at T0
    days: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(dict)  # day -> net [count, bytes, size x offset]
    parts: dict[int, dict[tuple[str, str], list[int]]] = {0: {}, 1: {}}  # net [count, bytes, size x offset]
    for row in session.execute(sa.text("\nUNION ALL\n".join(sql)), params):
        key, tag = (row[0], row[1]), int(row[2])
        n, b_hi, b_lo, w_hi, w_lo = (int(x or 0) for x in row[3:8])
        sums = [n, b_hi * _SPLIT + b_lo, w_hi * _SPLIT + w_lo]
        if tag == -1:
            hist[key] = sums[:2]
        elif tag >= 0:
            days[key][tag] = sums
        else:
            slot = parts[-2 - tag].setdefault(key, [0, 0, 0])
            for i in range(3):
                slot[i] += sums[i]
    zero = [0, 0, 0]
    cur: dict[tuple[Any, ...], list[int]] = {}
    for key in set(hist) | set(days) | set(parts[1]):
        whole = days.get(key, {}).values()
        n = hist.get(key, zero)[0] + sum(x[0] for x in whole) + parts[1].get(key, zero)[0]
        if n:
            b = hist.get(key, zero)[1] + sum(x[1] for x in whole) + parts[1].get(key, zero)[1]
            cur[key] = [n, b]
    if mode == "state":
        return {}, cur
    acc: dict[tuple[Any, ...], int] = {}
    last = (we - 1) // DAY
    for key in set(hist) | set(days) | set(parts[0]) | set(parts[1]):
        s0 = hist.get(key, zero)[1]
        by_day = days.get(key, {})
        p0, p1 = parts[0].get(key, zero), parts[1].get(key, zero)
        f_prev = (s0 + p0[1]) * (ws - t0) - p0[2]  # F(ws)
        nb = w = 0  # net bytes and size x (x - T0) of the whole days' edges so far
        if mode == "total":  # F(we) - F(ws), summing the day rows there are (no loop over empty days)
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
    return acc, cur


def _window_sums(
    session: Session,
    fine: list[str],
    *,
    ws: int,
    we: int,
    bucket_seconds: int | None,
    tenant_id: str | None,
    current_at_end: bool = False,
) -> tuple[dict[tuple[Any, ...], int], dict[tuple[Any, ...], list[int]]]:
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
    _tune(session)
    g = ", ".join(fine)
    n = len(fine)
    params: dict[str, Any] = {"ws": ws, "we": we}
    tenant_where = ""
    if tenant_id is not None:
        tenant_where = " AND tenant_id = :tenant"
        params["tenant"] = tenant_id
    # a checkpoint starting exactly at `we` is current at `we` but stores nothing inside the window
    start_le = "<=" if current_at_end else "<"

    def run(make: Any) -> list[Any]:
        if session.get_bind().dialect.name != "postgresql":
            return list(session.execute(sa.text(make(True)), params).all())
        try:
            with session.begin_nested():  # a bigint product above 2^63 (huge size x long span) raises: split
                return list(session.execute(sa.text(make(False)), params).all())
        except sa.exc.DataError:
            return list(session.execute(sa.text(make(True)), params).all())

    def mul_sums(split: bool, *factors: str) -> str:
        """Two columns per factor f, (hi, lo) with SUM(size * f) = hi * 10^6 + lo. Split (SQLite; the
        PostgreSQL fallback): its products silently turn float on overflow and its sum raises. Else
        (PostgreSQL) bigint products (an overflow raises, never wraps) and SUM(bigint) (exact)."""
        if split:
            return ", ".join(f"SUM(size_bytes / {_SPLIT} * {f}), SUM(size_bytes % {_SPLIT} * {f})" for f in factors)
        return ", ".join(f"0, SUM(size_bytes * {f})" for f in factors)

    if bucket_seconds is None:
        # one window, no buckets: one pass, grouped in index order (a tenant's rows stream, no sort)
        span = "((CASE WHEN stop_s < :we THEN stop_s ELSE :we END) - (CASE WHEN start_s > :ws THEN start_s ELSE :ws END))"

        def total(split: bool) -> str:
            return (
                f"SELECT {g}, {mul_sums(split, span)} FROM usage_interval "
                f"WHERE start_s < :we AND stop_s > :ws AND stop_s > start_s{tenant_where} GROUP BY {g}"
            )

        acc: dict[tuple[Any, ...], int] = {}
        for row in run(total):
            acc[tuple(row[:n])] = int(row[n] or 0) * _SPLIT + int(row[n + 1] or 0)
        return {k: v for k, v in acc.items() if v}, {}

    # Two halves, disjoint, each a range of the stop_s index and plain column arithmetic (no clipping
    # CASE per row): A = still stored at `we` (stop_s > we: all current, clipped stop = we);
    # B = stopping inside the window (ws < stop_s <= we). The start bucket is -1 for a start at or
    # before ws (clipped to ws: weight 0); offsets inside a bucket are `x % B` (< B: small products).
    B = int(bucket_seconds)
    sbx = f"CASE WHEN start_s > :ws THEN start_s / {B} ELSE -1 END"
    s_off, e_off = f"(start_s % {B})", f"(stop_s % {B})"

    def statement(split: bool) -> str:
        return f"""SELECT {g}, {sbx} AS sb, -1 AS eb, COUNT(*), SUM(size_bytes), SUM(size_bytes),
    {mul_sums(split, s_off)}, 0, 0
  FROM usage_interval WHERE stop_s > :we AND start_s {start_le} :we{tenant_where} GROUP BY {g}, {sbx}
UNION ALL
SELECT {g}, {sbx} AS sb, stop_s / {B} AS eb, 0, 0, SUM(size_bytes), {mul_sums(split, s_off, e_off)}
  FROM usage_interval WHERE stop_s > :ws AND stop_s <= :we AND stop_s > start_s{tenant_where}
  GROUP BY {g}, {sbx}, stop_s / {B}"""

    def statement_classes(split: bool) -> str:
        # All tenants (both backends) and SQLite: the big class (spanning the whole window) groups by
        # (tenant, kind[, run]) only -- few groups the planners estimate right, so PostgreSQL runs it
        # as a parallel partial aggregate and SQLite streams it from ix_usage_interval_cover without a
        # temp B-tree; the rest (a start or stop inside the window) clips with CASEs.
        s_x = "CASE WHEN start_s > :ws THEN start_s ELSE :ws END"
        e_x = "CASE WHEN stop_s < :we THEN stop_s ELSE :we END"
        s_o, e_o = f"(({s_x}) - ({s_x}) / {B} * {B})", f"(({e_x}) - ({e_x}) / {B} * {B})"
        now_n = "SUM(CASE WHEN stop_s > :we THEN 1 ELSE 0 END)"
        now_b = "SUM(CASE WHEN stop_s > :we THEN size_bytes ELSE 0 END)"
        return f"""SELECT {g}, -1 AS sb, -1 AS eb, {now_n}, {now_b}, SUM(size_bytes), 0, 0, 0, 0
  FROM usage_interval WHERE stop_s >= :we AND start_s <= :ws{tenant_where} GROUP BY {g}
UNION ALL
SELECT {g}, ({s_x}) / {B} AS sb, ({e_x}) / {B} AS eb, {now_n}, {now_b}, SUM(size_bytes), {mul_sums(split, s_o, e_o)}
  FROM usage_interval
  WHERE ((start_s > :ws AND start_s {start_le} :we) OR (stop_s > :ws AND stop_s < :we)) AND stop_s > start_s{tenant_where}
  GROUP BY {g}, sb, eb"""

    acc = defaultdict(int)
    cur: dict[tuple[Any, ...], list[int]] = {}
    # edges[key][bucket] = [sum of sizes starting (+) / stopping (-), sum of size * (instant - ws)]
    edges: dict[tuple[Any, ...], dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    first, last = ws // B, (we - 1) // B
    # measured at 1,000,000 intervals (docs/design-billing.md §4): halves A/B win for one tenant on
    # PostgreSQL (0.64 -> 0.24 s, tenant chart); the classes win for all tenants on both backends
    # (PostgreSQL overview 4.9 -> 2.2 s) and for everything on SQLite (tenant chart 0.79 -> 0.26 s)
    halves = tenant_id is not None and session.get_bind().dialect.name == "postgresql"
    for row in run(statement if halves else statement_classes):
        key, b_s, b_e = tuple(row[:n]), int(row[n]), int(row[n + 1])
        now_n, now_b, size, s_hi, s_lo, e_hi, e_lo = (int(x or 0) for x in row[n + 2 : n + 9])
        if now_n:  # stored at `we`
            slot = cur.setdefault(key, [0, 0])
            slot[0] += now_n
            slot[1] += now_b
        if b_s < 0:  # started at or before ws: clipped to ws
            b_s, s_w = first, 0
        else:
            s_w = s_hi * _SPLIT + s_lo + size * (b_s * B - ws)
        if b_e < 0:  # half A: clipped to we
            b_e, e_w = we // B, size * (we - ws)
        else:
            e_w = e_hi * _SPLIT + e_lo + size * (b_e * B - ws)
        edge = edges[key][b_s]
        edge[0] += size
        edge[1] += s_w
        edge = edges[key][b_e]
        edge[0] -= size
        edge[1] -= e_w
    # Byte-seconds stored before instant t: C(t) = sum_{s<t} size*(t-s) - sum_{e<t} size*(t-e), so
    # bucket b's usage is C(its end) - C(its start), exactly; prefix sums over the buckets.
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
    return {k: v for k, v in acc.items() if v}, cur


class _RateCache:
    """``(numerator, denominator)`` of each (tenant, kind)'s price per byte-second, computed once."""

    def __init__(self, pricing_: Pricing) -> None:
        self.pricing = pricing_
        self.cache: dict[tuple[str, str], tuple[int, int]] = {}

    def get(self, tenant_id: str, kind: str) -> tuple[int, int]:
        parts = self.cache.get((tenant_id, kind))
        if parts is None:
            f = Fraction(self.pricing.rate(tenant_id, kind)) / BYTE_SECONDS_PER_GB_MONTH
            parts = self.cache[(tenant_id, kind)] = (f.numerator, f.denominator)
        return parts


def _usage_rows(
    pricing_: Pricing, acc: dict[tuple[Any, ...], int], fine: list[str], cols: list[str], bucket_seconds: int | None
) -> list[UsageRow]:
    # Exact cost without a Fraction per fine row: a rate is num/den USD per byte-second, so costs of
    # one output row are kept as integer numerators per denominator and become Fractions once.
    rates = _RateCache(pricing_)
    ti, ki = fine.index("tenant_id"), fine.index("kind")
    pos = [fine.index(c) for c in cols]
    out: dict[tuple[Any, ...], list[Any]] = {}
    for fkey, bs in acc.items():
        num, den = rates.get(fkey[ti], fkey[ki])
        okey: tuple[Any, ...] = tuple(fkey[i] for i in pos)
        if bucket_seconds is not None:
            okey = (*okey, fkey[-1])
        slot = out.get(okey)
        if slot is None:
            slot = out[okey] = [0, {}]
        slot[0] += bs
        slot[1][den] = slot[1].get(den, 0) + bs * num
    rows = []
    for okey, (bs, by_den) in out.items():
        labels: dict[str, Any] = dict(zip(cols, okey, strict=False))
        if bucket_seconds is not None:
            labels["bucket"] = _bucket_label(okey[-1], bucket_seconds)
        if len(by_den) == 1:
            [(d, n)] = by_den.items()
            cost = Fraction(n, d)
        else:
            cost = sum((Fraction(n, d) for d, n in by_den.items()), Fraction(0))
        rows.append(UsageRow(key=labels, byte_seconds=bs, cost_exact_usd=cost))
    rows.sort(key=lambda r: tuple(str(v) for v in r.key.values()))
    return rows


def series(rows: Iterable[UsageRow], *, start: datetime, end: datetime, bucket_seconds: int = DAY) -> list[dict[str, Any]]:
    """Dense per-bucket totals (zeros included) of bucketed rows: for charts and CSV."""
    ws, we = epoch(start), epoch(end)
    sums: dict[str, list[Any]] = {}
    for b in range(ws // bucket_seconds, (we - 1) // bucket_seconds + 1):
        sums[_bucket_label(b, bucket_seconds)] = [0, Fraction(0)]
    for r in rows:
        slot = sums.setdefault(r.key["bucket"], [0, Fraction(0)])
        slot[0] += r.byte_seconds
        slot[1] += r.cost_exact_usd
    out = []
    for label, (bs, cost) in sums.items():
        b_start = max(ws, epoch(_parse_label(label)))
        b_end = min(we, epoch(_parse_label(label)) + bucket_seconds)
        span = max(1, b_end - b_start)
        out.append(
            {
                "bucket": label,
                "byte_seconds": bs,
                "average_gb": float(Decimal(bs) / span / GB),
                "gb_hours": float(Decimal(bs) / (GB * 3600)),
                "cost_usd": str(round_cents(cost)),
            }
        )
    return out


def _parse_label(label: str) -> datetime:
    if len(label) == 10:
        d = date.fromisoformat(label)
        return datetime(d.year, d.month, d.day, tzinfo=UTC)
    return datetime.fromisoformat(label)


# --- current usage ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurrentRow:
    key: dict[str, Any]
    checkpoint_count: int
    logical_bytes: int
    monthly_cost_exact_usd: Fraction
    """Cost of keeping today's bytes for 720 hours (the projection)."""

    @property
    def monthly_cost_usd(self) -> Decimal:
        return round_cents(self.monthly_cost_exact_usd)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.key)
        out.update(
            checkpoint_count=self.checkpoint_count,
            logical_bytes=self.logical_bytes,
            logical_gb=float(Decimal(self.logical_bytes) / GB),
            projected_monthly_cost_usd=str(self.monthly_cost_usd),
        )
        return out


def current(
    session: Session, pricing_: Pricing, *, now: datetime, group_by: Sequence[str] = ("tenant_id",), tenant_id: str | None = None
) -> list[CurrentRow]:
    """Checkpoints storing bytes at ``now`` per group, with a 720-hour cost projection."""
    cols = _check_groups(group_by)
    fine = _fine(cols)
    if "run_id" not in fine:  # per (tenant, kind): from usage_day and today's edges (§4)
        _, found = _day_sums(session, ws=epoch(now), we=epoch(now), tenant_id=tenant_id, mode="state")
        return _current_rows(pricing_, found, fine, cols)
    g = ", ".join(fine)
    _tune(session)
    tenant_where = " AND tenant_id = :tenant" if tenant_id is not None else ""
    sql = (
        f"SELECT {g}, COUNT(*), SUM(size_bytes) FROM usage_interval "
        f"WHERE start_s <= :now AND stop_s > :now{tenant_where} GROUP BY {g}"
    )
    params: dict[str, Any] = {"now": epoch(now)}
    if tenant_id is not None:
        params["tenant"] = tenant_id
    found = {tuple(row[: len(fine)]): [int(row[-2]), int(row[-1] or 0)] for row in session.execute(sa.text(sql), params)}
    return _current_rows(pricing_, found, fine, cols)


def _current_rows(
    pricing_: Pricing, found: dict[tuple[Any, ...], list[int]], fine: list[str], cols: list[str]
) -> list[CurrentRow]:
    out: dict[tuple[Any, ...], list[Any]] = {}
    for fkey, (count, size) in found.items():
        kv = dict(zip(fine, fkey, strict=False))
        cost = pricing_.cost(size * SECONDS_PER_MONTH, kv["tenant_id"], kv["kind"])
        slot = out.setdefault(tuple(kv[c] for c in cols), [0, 0, Fraction(0)])
        slot[0] += count
        slot[1] += size
        slot[2] += cost
    rows = [
        CurrentRow(key=dict(zip(cols, k, strict=False)), checkpoint_count=c, logical_bytes=s, monthly_cost_exact_usd=m)
        for k, (c, s, m) in out.items()
    ]
    rows.sort(key=lambda r: (-r.logical_bytes, tuple(str(v) for v in r.key.values())))
    return rows


@dataclass(frozen=True)
class Overview:
    """All tenants at ``now``: what the admin overview page shows, from ONE pass over the intervals."""

    current: list[CurrentRow]
    """Per tenant, as ``current(now=now)`` returns it."""
    daily: list[UsageRow]
    """Per tenant and bucket in ``[start, now)``, as ``usage(start, now, bucket_seconds)`` returns it."""


def overview(session: Session, pricing_: Pricing, *, now: datetime, start: datetime, bucket_seconds: int = DAY) -> Overview:
    """``current(now)`` and ``usage(start, now, bucket_seconds)`` of all tenants in one query.

    The intervals overlapping ``[start, now)`` are read once; the ones still stored at ``now`` are
    exactly those among them with ``stop_s > now``, so the same statement also counts them."""
    ws, we = epoch(start), epoch(now)
    if we <= ws:
        raise InvalidRequest("the window must end after it starts")
    if (we - ws) // bucket_seconds > 24 * 400:
        raise InvalidRequest("too many buckets for this window")
    fine = ["tenant_id", "kind"]
    if bucket_seconds == DAY:  # whole days from usage_day: O(tenants x kinds x days) rows (§4)
        acc, cur = _day_sums(session, ws=ws, we=we, tenant_id=None)
    else:
        acc, cur = _window_sums(session, fine, ws=ws, we=we, bucket_seconds=bucket_seconds, tenant_id=None, current_at_end=True)
    return Overview(
        current=_current_rows(pricing_, cur, fine, ["tenant_id"]),
        daily=_usage_rows(pricing_, acc, fine, ["tenant_id"], bucket_seconds),
    )


def physical_current(session: Session, *, now: datetime, tenant_id: str | None = None) -> dict[str, int]:
    """Unique blob bytes referenced by each tenant's visible checkpoints (dedup counted once).

    Derived from the manifest, so it describes *now* only; history is reported in logical bytes
    (what is billed). A manifest row carries its blob's size (content-addressed: one sha256, one
    size; the upload commit verifies it), so the blob table is not joined: one pass over the live
    checkpoints' manifest rows, index-only (``ix_checkpoint_billing_live``, ``ix_checkpoint_file_blob``),
    then one ``DISTINCT`` of (tenant, sha256)."""
    _tune(session)
    where = "AND c.tenant_id = :tenant" if tenant_id is not None else ""
    sql = f"""
SELECT tenant_id, SUM(size_bytes) FROM (
  SELECT DISTINCT c.tenant_id, f.sha256, f.size_bytes FROM checkpoint c JOIN checkpoint_file f ON f.checkpoint_id = c.id
  WHERE c.state = 'committed' AND (c.expires_at IS NULL OR c.expires_at > :now) {where}) u
GROUP BY tenant_id"""
    params: dict[str, Any] = {"now": now if dialect_is_pg(session) else _sqlite_ts(now)}
    if tenant_id is not None:
        params["tenant"] = tenant_id
    return {t: int(s or 0) for t, s in session.execute(sa.text(sql), params)}


def dialect_is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _sqlite_ts(dt: datetime) -> str:
    return dt.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


# --- invoices -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InvoiceLine:
    run_id: str
    kind: str
    byte_seconds: int
    rate_usd_per_gb_month: Decimal
    amount_usd: Decimal  # rounded half-even to the cent

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
    tenant_id: str
    month: str
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


def invoice(session: Session, pricing_: Pricing, *, tenant_id: str, month: str, now: datetime | None = None) -> Invoice:
    """One calendar month (UTC) of one tenant, a line per (run, kind). With ``now`` inside the
    month, the invoice runs to date (open-ended checkpoints accrue until ``now``, never beyond)."""
    start, end = month_window(month)
    measured_end = end if now is None else min(end, now)
    rows = (
        []
        if measured_end <= start
        else usage(session, pricing_, start=start, end=measured_end, group_by=("run_id", "kind"), tenant_id=tenant_id)
    )
    lines = [
        InvoiceLine(
            run_id=r.key["run_id"],
            kind=r.key["kind"],
            byte_seconds=r.byte_seconds,
            rate_usd_per_gb_month=pricing_.rate(tenant_id, r.key["kind"]),
            amount_usd=r.cost_usd,
        )
        for r in rows
        if r.byte_seconds > 0
    ]
    lines.sort(key=lambda line: (line.kind, line.run_id))
    return Invoice(tenant_id=tenant_id, month=month, period_start=start, period_end=end, lines=lines)


# --- checkpoint lists for the tenant page (catalog rows, current state) -------------------------
def largest_checkpoints(session: Session, *, tenant_id: str, now: datetime, limit: int = 10) -> list[dict[str, Any]]:
    return _checkpoint_list(session, tenant_id=tenant_id, now=now, limit=limit, by_expiry=False)


def expiring_soon(session: Session, *, tenant_id: str, now: datetime, limit: int = 10) -> list[dict[str, Any]]:
    return _checkpoint_list(session, tenant_id=tenant_id, now=now, limit=limit, by_expiry=True)


def _checkpoint_list(session: Session, *, tenant_id: str, now: datetime, limit: int, by_expiry: bool) -> list[dict[str, Any]]:
    from weightstore.checkpoints import visible_clause
    from weightstore.models import Checkpoint

    q = sa.select(
        Checkpoint.id,
        Checkpoint.run_id,
        Checkpoint.kind,
        Checkpoint.name,
        Checkpoint.size_bytes,  # type: ignore[call-overload]
        Checkpoint.created_at,
        Checkpoint.expires_at,
    ).where(Checkpoint.tenant_id == tenant_id, visible_clause(now))
    if by_expiry:
        q = q.where(Checkpoint.expires_at.is_not(None))  # type: ignore[union-attr]
        q = q.order_by(Checkpoint.expires_at.asc(), Checkpoint.id)  # type: ignore[union-attr]
    else:
        q = q.order_by(Checkpoint.size_bytes.desc(), Checkpoint.id)  # type: ignore[attr-defined]
    rows = session.execute(q.limit(limit)).all()
    return [dict(r._mapping) for r in rows]
