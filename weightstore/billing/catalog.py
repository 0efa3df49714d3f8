"""Present-state reads for billing pages: physical bytes, largest and soonest-expiring checkpoints.

Reads of the catalog (``checkpoint``, ``checkpoint_file``) that describe the present, not a bill:
physical (deduplicated) bytes, and the largest and soonest-expiring checkpoints of a tenant
(docs/design-billing.md §1, §9)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from weightstore.billing.aggregates import tune
from weightstore.billing.billable import billed_only_sql
from weightstore.checkpoints import visible_clause
from weightstore.models import Checkpoint


def physical_current(session: Session, *, now: datetime, tenant_id: str | None = None) -> dict[str, int]:
    """Unique blob bytes referenced by each tenant's visible checkpoints (dedup counted once): of one
    tenant, or of every billed tenant.

    Derived from the manifest, so it describes *now* only; history is reported in logical bytes
    (what is billed). A manifest row carries its blob's size (content-addressed: one sha256, one
    size; the upload commit verifies it), so the blob table is not joined: one pass over the live
    checkpoints' manifest rows, index-only (``ix_checkpoint_billing_live``, ``ix_checkpoint_file_blob``),
    then one ``DISTINCT`` of (tenant, sha256)."""
    tune(session)
    params: dict[str, Any] = {"now": now if session.get_bind().dialect.name == "postgresql" else _sqlite_timestamp(now)}
    if tenant_id is not None:
        where = "AND c.tenant_id = :tenant"
        params["tenant"] = tenant_id
    else:  # every billed tenant: operator tenants are not billed (weightstore.billing.billable)
        where = billed_only_sql(params, "c.tenant_id")
    sql = f"""
SELECT tenant_id, SUM(size_bytes) FROM (
  SELECT DISTINCT c.tenant_id, f.sha256, f.size_bytes FROM checkpoint c JOIN checkpoint_file f ON f.checkpoint_id = c.id
  WHERE c.state = 'committed' AND (c.expires_at IS NULL OR c.expires_at > :now) {where}) u
GROUP BY tenant_id"""
    return {t: int(s or 0) for t, s in session.execute(sa.text(sql), params)}


def _sqlite_timestamp(dt: datetime) -> str:
    """``dt`` as SQLite stores a ``UTCDateTime`` (naive UTC text), for a plain-SQL comparison."""
    return dt.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def largest_checkpoints(session: Session, *, tenant_id: str, now: datetime, limit: int = 10) -> list[dict[str, Any]]:
    """The tenant's visible checkpoints, largest first."""
    return _checkpoint_list(session, tenant_id=tenant_id, now=now, limit=limit, by_expiry=False)


def expiring_soon(session: Session, *, tenant_id: str, now: datetime, limit: int = 10) -> list[dict[str, Any]]:
    """The tenant's visible checkpoints that have an expiry, soonest first."""
    return _checkpoint_list(session, tenant_id=tenant_id, now=now, limit=limit, by_expiry=True)


def _checkpoint_list(session: Session, *, tenant_id: str, now: datetime, limit: int, by_expiry: bool) -> list[dict[str, Any]]:
    q = sa.select(
        col(Checkpoint.id),
        col(Checkpoint.run_id),
        col(Checkpoint.kind),
        col(Checkpoint.name),
        col(Checkpoint.size_bytes),
        col(Checkpoint.created_at),
        col(Checkpoint.expires_at),
    ).where(col(Checkpoint.tenant_id) == tenant_id, visible_clause(now))
    if by_expiry:
        q = q.where(col(Checkpoint.expires_at).is_not(None))
        q = q.order_by(col(Checkpoint.expires_at).asc(), col(Checkpoint.id))
    else:
        q = q.order_by(col(Checkpoint.size_bytes).desc(), col(Checkpoint.id))
    rows = session.execute(q.limit(limit)).all()
    return [dict(r._mapping) for r in rows]
