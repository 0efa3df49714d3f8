"""Writes to the append-only usage ledger (``usage_event``). Billing reads nothing else.

Rows are only ever inserted. Storage of a checkpoint accrues from its ``commit`` event to its
``end`` event; an ``end`` for an expiry is stamped with the checkpoint's ``expires_at`` (not the
moment the collector noticed), and ``ttl`` events record every change of ``expires_at`` so that a
bill for any past window can be recomputed from the rows alone. Event kinds are ``UsageEventKind``.

Every writer also refreshes the checkpoint's derived ``usage_interval`` row and the per-day edge sums
in ``usage_day`` (``weightstore.billing.intervals.refresh_intervals``) in the same transaction, so
billing queries read one row per checkpoint (or per tenant, kind and day) instead of regrouping the
ledger. All functions here are catalog functions: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.sql.elements import SQLCoreOperations
from sqlmodel import Session, col

from weightstore.billing.intervals import lock_intervals, refresh_intervals
from weightstore.models import Checkpoint, UsageEvent, UsageEventKind, UTCDateTime


def record(
    session: Session,
    *,
    tenant_id: str,
    run_id: str,
    checkpoint_id: str,
    kind: str,
    event: UsageEventKind,
    at: datetime,
    size_bytes: int,
    expires_at: datetime | None,
    recorded_at: datetime,
) -> None:
    """Append one ledger row and refresh the checkpoint's derived ``usage_interval`` row from its
    ledger rows, in the caller's transaction (the one path every writer goes through)."""
    lock_intervals(session, [checkpoint_id])
    session.add(
        UsageEvent(
            tenant_id=tenant_id,
            run_id=run_id,
            checkpoint_id=checkpoint_id,
            kind=kind,
            event=event,
            at=at,
            size_bytes=size_bytes,
            expires_at=expires_at,
            recorded_at=recorded_at,
        )
    )
    refresh_intervals(session, [checkpoint_id])


def _record_checkpoint(session: Session, ckpt: Checkpoint, event: UsageEventKind, at: datetime, recorded_at: datetime) -> None:
    """``record`` of one event carrying the checkpoint's current size and ``expires_at``."""
    record(
        session,
        tenant_id=ckpt.tenant_id,
        run_id=ckpt.run_id,
        checkpoint_id=ckpt.id,
        kind=ckpt.kind,
        event=event,
        at=at,
        size_bytes=ckpt.size_bytes,
        expires_at=ckpt.expires_at,
        recorded_at=recorded_at,
    )


def on_commit(session: Session, ckpt: Checkpoint, *, now: datetime) -> None:
    """The checkpoint was committed: storage starts at its ``created_at``."""
    _record_checkpoint(session, ckpt, UsageEventKind.commit, ckpt.created_at, now)


def on_end(session: Session, ckpt: Checkpoint, *, at: datetime, now: datetime) -> None:
    """The checkpoint stopped storing bytes at ``at`` (delete, overwrite, expiry)."""
    _record_checkpoint(session, ckpt, UsageEventKind.end, at, now)


def on_ttl(session: Session, ckpt: Checkpoint, *, now: datetime) -> None:
    """The checkpoint's ``expires_at`` changed (the new value is on ``ckpt``)."""
    _record_checkpoint(session, ckpt, UsageEventKind.ttl, now, now)


def on_restore(session: Session, ckpt: Checkpoint, *, now: datetime) -> None:
    """An expiry was undone: cancels the earlier ``end`` rows (billed without a gap)."""
    _record_checkpoint(session, ckpt, UsageEventKind.restore, now, now)


def on_end_expired(session: Session, checkpoint_ids: Sequence[str], *, now: datetime, at: datetime | None = None) -> None:
    """Bulk ``on_end`` for TTL expiries: one ``end`` event per checkpoint, each stamped at its own
    ``expires_at`` (one INSERT ... SELECT; the caller holds the rows, e.g. via UPDATE ... RETURNING).
    With ``at`` (a tenant delete) each is stamped at ``at``, or at its ``expires_at`` if that came first."""
    if not checkpoint_ids:
        return
    end_at: SQLCoreOperations[datetime | None] = col(Checkpoint.expires_at)
    if at is not None:
        end_at = sa.case(
            (sa.and_(col(Checkpoint.expires_at).is_not(None), col(Checkpoint.expires_at) < at), col(Checkpoint.expires_at)),
            else_=sa.literal(at, UTCDateTime()),
        )
    cols = ["tenant_id", "run_id", "checkpoint_id", "kind", "event", "at", "size_bytes", "expires_at", "recorded_at"]
    rows = sa.select(
        col(Checkpoint.tenant_id),
        col(Checkpoint.run_id),
        col(Checkpoint.id),
        col(Checkpoint.kind),
        sa.literal(UsageEventKind.end.value, sa.String()),
        end_at,
        col(Checkpoint.size_bytes),
        col(Checkpoint.expires_at),
        sa.literal(now, UTCDateTime()),
    ).where(col(Checkpoint.id).in_(checkpoint_ids))
    lock_intervals(session, checkpoint_ids)
    session.execute(sa.insert(UsageEvent).from_select(cols, rows))
    refresh_intervals(session, checkpoint_ids)
