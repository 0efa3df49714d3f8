"""Writes to the append-only usage ledger (``usage_event``). Billing reads nothing else.

Rows are only ever inserted. Storage of a checkpoint accrues from its ``commit`` event to its
``end`` event; an ``end`` for an expiry is stamped with the checkpoint's ``expires_at`` (not the
moment the collector noticed), and ``ttl`` events record every change of ``expires_at`` so that a
bill for any past window can be recomputed from the rows alone.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from weightstore.models import Checkpoint, UsageEvent


def _event(session: Session, ckpt: Checkpoint, event: str, at: datetime, recorded_at: datetime) -> None:
    session.add(UsageEvent(tenant_id=ckpt.tenant_id, run_id=ckpt.run_id, checkpoint_id=ckpt.id, kind=ckpt.kind,
                           event=event, at=at, size_bytes=ckpt.size_bytes, expires_at=ckpt.expires_at,
                           recorded_at=recorded_at))


def on_commit(session: Session, ckpt: Checkpoint, *, now: datetime) -> None:
    _event(session, ckpt, "commit", ckpt.created_at, now)


def on_end(session: Session, ckpt: Checkpoint, *, at: datetime, now: datetime) -> None:
    _event(session, ckpt, "end", at, now)


def on_ttl(session: Session, ckpt: Checkpoint, *, now: datetime) -> None:
    _event(session, ckpt, "ttl", now, now)


def on_restore(session: Session, ckpt: Checkpoint, *, now: datetime) -> None:
    _event(session, ckpt, "restore", now, now)
