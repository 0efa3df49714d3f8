"""Admin restore of an expired checkpoint (undo an expiry until the collector releases it)."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from weightstore import audit, ledger
from weightstore.auth import Principal
from weightstore.errors import AlreadyExists, InvalidRequest, NotFound
from weightstore.models import Blob, BlobState, Checkpoint, CheckpointFile, CheckpointState
from weightstore.settings import Settings


def restore_checkpoint(
    session: Session,
    principal: Principal,
    checkpoint_id: str,
    *,
    settings: Settings,
    now: datetime,
    ttl_seconds: int | None = None,
    request_id: str | None = None,
) -> Checkpoint:
    """``expired`` → ``committed`` with a new expiry (``ttl_seconds`` from now; ``None`` = none).

    Refused once the checkpoint is released (``deleted``) or any of its blobs is not ``live``: the
    blob rows are locked (PostgreSQL) so the collector cannot tombstone them meanwhile (rule G8).
    """
    principal.require_admin()
    q = select(Checkpoint).where(Checkpoint.id == checkpoint_id)
    pg = session.get_bind().dialect.name == "postgresql"
    if pg:
        q = q.with_for_update()
    ckpt = session.exec(q).first()
    if ckpt is None:
        raise NotFound(f"checkpoint {checkpoint_id} not found")
    if ckpt.state != CheckpointState.expired.value:
        raise InvalidRequest(f"checkpoint {checkpoint_id} is {ckpt.state}; only expired checkpoints can be restored")
    if ttl_seconds is not None and not settings.ttl_min_seconds <= ttl_seconds <= settings.ttl_max_seconds:
        raise InvalidRequest(f"ttl_seconds is out of range ({settings.ttl_min_seconds}..{settings.ttl_max_seconds})")
    shas = sa.select(CheckpointFile.sha256).where(CheckpointFile.checkpoint_id == ckpt.id)  # type: ignore[call-overload]
    bq = sa.select(Blob.sha256, Blob.state).where(Blob.sha256.in_(shas))  # type: ignore[call-overload,attr-defined]
    if pg:
        bq = bq.with_for_update()
    states = session.execute(bq).all()
    if any(st != BlobState.live.value for _, st in states):
        raise InvalidRequest(f"checkpoint {checkpoint_id} is already being collected")
    clash = session.exec(
        select(Checkpoint).where(
            Checkpoint.run_id == ckpt.run_id,
            Checkpoint.kind == ckpt.kind,
            Checkpoint.name == ckpt.name,
            Checkpoint.state == CheckpointState.committed.value,
        )
    ).first()
    if clash is not None:
        raise AlreadyExists(f"a newer checkpoint named {ckpt.name!r} exists in run {ckpt.run_id}")
    ckpt.state = CheckpointState.committed.value
    ckpt.expires_at = None if ttl_seconds is None else now + timedelta(seconds=ttl_seconds)
    session.add(ckpt)
    session.execute(sa.update(Blob).where(Blob.sha256.in_(shas)).values(last_referenced_at=now))  # type: ignore[attr-defined]
    ledger.on_restore(session, ckpt, now=now)
    audit.record(
        session,
        at=now,
        action="checkpoint.restore",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=checkpoint_id,
        request_id=request_id,
        ttl_seconds=ttl_seconds,
    )
    return ckpt
