"""The derived ``usage_interval`` table: one billing interval per checkpoint, computed from the ledger.

Billing stays a pure function of the append-only ``usage_event`` rows; this table only caches the
one step that is expensive to repeat on every query (grouping the ledger into one interval per
checkpoint). One SQL statement (``_derive_sql``) defines it, used two ways:

* ``refresh_intervals(session, ids)``: the ledger writers call it after inserting a checkpoint's
  event, in the same transaction (upsert of that checkpoint's row from *all* its ledger rows);
* ``rebuild_intervals(session)``: every row recomputed from the whole ledger (migration data step,
  bulk loads, repair). Tests assert that the maintained table equals a rebuild and a plain-Python
  recomputation after random operations.

Interval rule (docs/design-billing.md §2): start = first ``commit``; stop = min(first ``end`` not
cancelled by a later ``restore``, ``expires_at`` of the latest ledger row), clamped to ≥ start;
``OPEN_END_S`` while neither exists. Times are whole epoch seconds (floored).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import Session

from weightstore.models import OPEN_END_S, UsageInterval

COLUMNS = ("checkpoint_id", "tenant_id", "run_id", "kind", "size_bytes", "start_s", "end_s", "expires_s", "stop_s")


def _dialect(conn: Session | Connection) -> str:
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    return bind.dialect.name


def epoch_sql(dialect: str, col: str) -> str:
    """Whole epoch seconds (floored) of a timestamp column, as a 64-bit integer."""
    if dialect == "sqlite":
        return f"CAST(strftime('%s', {col}) AS INTEGER)"
    return f"CAST(floor(extract(epoch FROM {col})) AS BIGINT)"


def _derive_sql(dialect: str, only_some: bool) -> str:
    """``INSERT ... SELECT`` of the interval rows of all (or ``:ids``) checkpoints, upserting."""
    ep = lambda c: epoch_sql(dialect, c)  # noqa: E731
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
      MAX(CASE WHEN e.event = 'commit' THEN e.size_bytes END) AS size_bytes,
      {ep("MIN(CASE WHEN e.event = 'commit' THEN e.at END)")} AS start_s,
      {ep("MIN(CASE WHEN e.event = 'end' AND e.id > h.r THEN e.at END)")} AS end_s,
      {ep("MAX(CASE WHEN e.id = h.m THEN e.expires_at END)")} AS expires_s
    FROM usage_event e JOIN (
      SELECT checkpoint_id, MAX(id) AS m, COALESCE(MAX(CASE WHEN event = 'restore' THEN id END), 0) AS r
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
    if checkpoint_ids and _dialect(session) == "postgresql":
        session.execute(sa.select(UsageInterval.checkpoint_id)  # type: ignore[call-overload]
                        .where(UsageInterval.checkpoint_id.in_(sorted(set(checkpoint_ids))))  # type: ignore[attr-defined]
                        .order_by(UsageInterval.checkpoint_id).with_for_update()).all()


def refresh_intervals(session: Session, checkpoint_ids: Sequence[str]) -> None:
    """Recompute these checkpoints' interval rows from all their ledger rows (flushes first)."""
    if not checkpoint_ids:
        return
    session.flush()
    stmt = sa.text(_derive_sql(_dialect(session), only_some=True)).bindparams(sa.bindparam("ids", expanding=True))
    for i in range(0, len(checkpoint_ids), 500):
        session.execute(stmt, {"ids": list(checkpoint_ids[i:i + 500])})


def rebuild_intervals(session: Session | Connection) -> int:
    """Recompute ``usage_interval`` from the whole ledger (same SQL as the writers' refresh);
    returns the number of rows. Takes a session or a connection (the migration's data step)."""
    if isinstance(session, Session):
        session.flush()
    session.execute(sa.text("DELETE FROM usage_interval"))
    session.execute(sa.text(_derive_sql(_dialect(session), only_some=False)))
    return int(session.execute(sa.text("SELECT COUNT(*) FROM usage_interval")).scalar_one())
