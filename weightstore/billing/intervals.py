"""The derived tables billing reads, kept equal to the ledger: ``usage_interval`` and ``usage_day``.

Billing stays a pure function of the append-only ``usage_event`` rows; these tables only cache the
steps that are expensive to repeat on every query (docs/design-billing.md §3).

``usage_interval``: one billing interval per checkpoint. One SQL statement (``derive_sql``) defines
it, used two ways:

* ``refresh_intervals(session, ids)``: the ledger writers call it after inserting a checkpoint's
  event, in the same transaction (upsert of that checkpoint's row from *all* its ledger rows);
* ``rebuild_intervals(session)``: every row recomputed from the whole ledger (bulk loads, repair).
  Tests assert that the maintained table equals a rebuild and a plain-Python recomputation after
  random operations.

Interval rule (docs/design-billing.md §2): start = first ``commit``; stop = min(first ``end`` not
cancelled by a later ``restore``, ``expires_at`` of the latest ledger row), clamped to ≥ start;
``OPEN_END_S`` while neither exists. Times are whole epoch seconds (floored).

``usage_day`` (``weightstore.models.UsageDay``): per (tenant, kind, UTC day) the sums over the
intervals' edges (starts and finite stops) in that day. ``refresh_intervals`` applies (new edges -
old edges) of the checkpoints it refreshes, in the same transaction; ``rebuild_intervals``
recomputes it too (``rebuild_days``: one ``INSERT ... SELECT ... GROUP BY``).

The migrations that created these tables carry their own frozen copies of this SQL: a change here
changes what the service maintains from now on, never what an old migration did.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import Session, col

from weightstore.billing.units import DAY, SPLIT
from weightstore.db import for_write
from weightstore.models import OPEN_END_S, UsageEventKind, UsageInterval

COLUMNS = ("checkpoint_id", "tenant_id", "run_id", "kind", "size_bytes", "start_s", "end_s", "expires_s", "stop_s")
"""The columns of ``usage_interval``, in the order ``derive_sql`` inserts them."""
DAY_SUMS = ("starts", "start_bytes", "start_off_hi", "start_off_lo", "stops", "stop_bytes", "stop_off_hi", "stop_off_lo")
"""The sum columns of ``usage_day``: four per edge kind (count, bytes, size x offset split at ``SPLIT``)."""
EDGE_COLUMNS = "checkpoint_id, tenant_id, kind, size_bytes, start_s, stop_s"
"""What ``add_edges`` needs of an interval row."""
REFRESH_BATCH = 500
"""Checkpoints per refresh statement (bounds the ``IN`` list a bulk expiry sends)."""

DaySums = dict[tuple[str, str, int], list[int]]
"""``usage_day`` deltas per (tenant, kind, day), in ``DAY_SUMS`` order."""


def dialect_of(conn: Session | Connection) -> str:
    """The database dialect's name (``sqlite`` or ``postgresql``) of a session or connection."""
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    return bind.dialect.name


def epoch_sql(dialect: str, col: str) -> str:
    """Whole epoch seconds (floored) of a timestamp column, as a 64-bit integer."""
    if dialect == "sqlite":
        return f"CAST(strftime('%s', {col}) AS INTEGER)"
    return f"CAST(floor(extract(epoch FROM {col})) AS BIGINT)"


def derive_sql(dialect: str, only_some: bool) -> str:
    """``INSERT ... SELECT`` of the interval rows of all (or ``:ids``) checkpoints, upserting."""
    commit, end, restore = (UsageEventKind.commit.value, UsageEventKind.end.value, UsageEventKind.restore.value)

    def ep(col: str) -> str:
        return epoch_sql(dialect, col)

    f_h = "WHERE checkpoint_id IN :ids" if only_some else ""
    f_e = "WHERE e.checkpoint_id IN :ids" if only_some else ""
    cols = ", ".join(COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
    return f"""
INSERT INTO usage_interval ({cols})
SELECT checkpoint_id, tenant_id, run_id, kind, size_bytes, start_s, end_s, expires_s,
  CASE WHEN stop_s < start_s THEN start_s ELSE stop_s END
FROM (
  SELECT checkpoint_id, tenant_id, run_id, kind, size_bytes, start_s, end_s, expires_s,
    CASE WHEN end_s IS NULL AND expires_s IS NULL THEN {OPEN_END_S}
         WHEN end_s IS NULL THEN expires_s
         WHEN expires_s IS NULL OR end_s < expires_s THEN end_s
         ELSE expires_s END AS stop_s
  FROM (
    SELECT e.checkpoint_id, MIN(e.tenant_id) AS tenant_id, MIN(e.run_id) AS run_id, MIN(e.kind) AS kind,
      MAX(CASE WHEN e.event = '{commit}' THEN e.size_bytes END) AS size_bytes,
      {ep(f"MIN(CASE WHEN e.event = '{commit}' THEN e.at END)")} AS start_s,
      {ep(f"MIN(CASE WHEN e.event = '{end}' AND e.id > h.r THEN e.at END)")} AS end_s,
      {ep("MAX(CASE WHEN e.id = h.m THEN e.expires_at END)")} AS expires_s
    FROM usage_event e JOIN (
      SELECT checkpoint_id, MAX(id) AS m, COALESCE(MAX(CASE WHEN event = '{restore}' THEN id END), 0) AS r
      FROM usage_event {f_h} GROUP BY checkpoint_id) h ON h.checkpoint_id = e.checkpoint_id
    {f_e}
    GROUP BY e.checkpoint_id) agg
  WHERE start_s IS NOT NULL) iv
WHERE true
ON CONFLICT (checkpoint_id) DO UPDATE SET {updates}"""


def lock_intervals(session: Session, checkpoint_ids: Sequence[str]) -> None:
    """Row-lock the checkpoints' interval rows (PostgreSQL) *before* their ledger rows are inserted.

    Two transactions writing events of one checkpoint then queue here, so the second inserts its
    event (and takes its id) after the first committed, and its refresh sees the first's event.
    SQLite needs nothing: ``BEGIN IMMEDIATE`` already serialises writers."""
    if checkpoint_ids and dialect_of(session) == "postgresql":
        session.execute(
            for_write(
                sa.select(col(UsageInterval.checkpoint_id))
                .where(col(UsageInterval.checkpoint_id).in_(sorted(set(checkpoint_ids))))
                .order_by(col(UsageInterval.checkpoint_id))
            )
        ).all()


def add_edges(rows: Iterable[Sequence[Any]], sign: int, into: DaySums) -> None:
    """Add ``sign`` x the ``usage_day`` sums of these interval rows' edges (``EDGE_COLUMNS``) into ``into``."""
    for _ck, tenant, kind, size, start_s, stop_s in rows:
        size, start_s, stop_s = int(size), int(start_s), int(stop_s)
        hi, lo = divmod(size, SPLIT)
        edges = [(0, start_s)] if stop_s == OPEN_END_S else [(0, start_s), (4, stop_s)]
        for base, at in edges:
            day, off = divmod(at, DAY)
            slot = into[(tenant, kind, day)]
            slot[base] += sign
            slot[base + 1] += sign * size
            slot[base + 2] += sign * hi * off
            slot[base + 3] += sign * lo * off


@cache
def _refresh_statements(dialect: str) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause]:
    """(upsert of interval rows, read of their edges, upsert of usage_day deltas): built and parsed
    once per dialect, since every ledger write runs them."""
    derive = sa.text(derive_sql(dialect, only_some=True)).bindparams(sa.bindparam("ids", expanding=True))
    read = sa.text(f"SELECT {EDGE_COLUMNS} FROM usage_interval WHERE checkpoint_id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True)
    )
    cols = ", ".join(DAY_SUMS)
    values = ", ".join(f":{c}" for c in DAY_SUMS)
    updates = ", ".join(f"{c} = usage_day.{c} + excluded.{c}" for c in DAY_SUMS)
    upsert = sa.text(
        f"INSERT INTO usage_day (tenant_id, kind, day, {cols}) VALUES (:tenant_id, :kind, :day, {values}) "
        f"ON CONFLICT (tenant_id, kind, day) DO UPDATE SET {updates}"
    )
    return derive, read, upsert


def refresh_intervals(session: Session, checkpoint_ids: Sequence[str]) -> None:
    """Recompute these checkpoints' interval rows from all their ledger rows (flushes first), and
    apply the change of their edges (new minus old) to ``usage_day``, in the caller's transaction.

    The ``usage_day`` rows are updated in sorted key order, so two transactions touching the same
    days take the row locks in the same order (no deadlock on PostgreSQL); writers of one checkpoint
    are already serialised by ``lock_intervals``."""
    if not checkpoint_ids:
        return
    session.flush()
    stmt, read, upsert = _refresh_statements(dialect_of(session))
    deltas: DaySums = defaultdict(lambda: [0] * len(DAY_SUMS))
    for i in range(0, len(checkpoint_ids), REFRESH_BATCH):
        ids = list(checkpoint_ids[i : i + REFRESH_BATCH])
        add_edges(session.execute(read, {"ids": ids}).all(), -1, deltas)
        session.execute(stmt, {"ids": ids})
        add_edges(session.execute(read, {"ids": ids}).all(), +1, deltas)
    params = [
        {"tenant_id": t, "kind": k, "day": d, **dict(zip(DAY_SUMS, v, strict=True))}
        for (t, k, d), v in sorted(deltas.items())
        if any(v)
    ]
    if params:
        session.execute(upsert, params)


def rebuild_days_sql() -> str:
    """``INSERT ... SELECT`` of every ``usage_day`` row from ``usage_interval`` (the table must be empty)."""

    def sums(col: str) -> list[str]:
        off = f"({col} % {DAY})"
        return ["1", "size_bytes", f"size_bytes / {SPLIT} * {off}", f"size_bytes % {SPLIT} * {off}"]

    starts = [f"{x} AS {c}" for x, c in zip(sums("start_s") + ["0"] * 4, DAY_SUMS, strict=True)]
    stops = ["0"] * 4 + sums("stop_s")
    cols = ", ".join(DAY_SUMS)
    return f"""
INSERT INTO usage_day (tenant_id, kind, day, {cols})
SELECT tenant_id, kind, day, {", ".join(f"SUM({c})" for c in DAY_SUMS)} FROM (
  SELECT tenant_id, kind, start_s / {DAY} AS day, {", ".join(starts)} FROM usage_interval
  UNION ALL
  SELECT tenant_id, kind, stop_s / {DAY}, {", ".join(stops)} FROM usage_interval WHERE stop_s < {OPEN_END_S}
) e
GROUP BY tenant_id, kind, day"""


def rebuild_days(session: Session | Connection) -> int:
    """Recompute ``usage_day`` from ``usage_interval`` (``rebuild_intervals``); returns the number of rows."""
    session.execute(sa.text("DELETE FROM usage_day"))
    session.execute(sa.text(rebuild_days_sql()))
    return int(session.execute(sa.text("SELECT COUNT(*) FROM usage_day")).scalar_one())


def derive_intervals(session: Session | Connection) -> int:
    """Recompute ``usage_interval`` alone from the whole ledger (same SQL as the writers' refresh);
    returns its number of rows."""
    if isinstance(session, Session):
        session.flush()
    session.execute(sa.text("DELETE FROM usage_interval"))
    session.execute(sa.text(derive_sql(dialect_of(session), only_some=False)))
    return int(session.execute(sa.text("SELECT COUNT(*) FROM usage_interval")).scalar_one())


def rebuild_intervals(session: Session | Connection) -> int:
    """Recompute ``usage_interval`` from the whole ledger and ``usage_day`` from it (bulk loads,
    repair); returns the number of interval rows. Takes a session or a connection."""
    n = derive_intervals(session)
    rebuild_days(session)
    return n
