"""Retention rules: the one TTL check, per-tenant default TTLs, restore of an expired checkpoint.

Restore undoes an expiry until the collector releases the checkpoint (one grace period after it
expired).

Every function here is a catalog function: it takes the caller's ``session`` and never commits.
The collector *applies* retention (expire, release, sweep: ``weightstore_gc``); the rules it
applies live here and in ``checkpoints`` so that the API and the CLI need only the core.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore import audit
from weightstore.auth import Principal
from weightstore.billing import ledger
from weightstore.errors import AlreadyExists, InvalidRequest, InvalidTTL, NotFound
from weightstore.models import Blob, BlobState, Checkpoint, CheckpointFile, CheckpointState, Tenant
from weightstore.settings import Settings


def check_ttl(settings: Settings, ttl_seconds: int | None) -> None:
    """Raise ``InvalidTTL`` unless ``ttl_seconds`` is ``None`` (no expiry) or an int within the
    configured bounds. The one TTL check: uploads, ``set_ttl``, exports, default TTLs and restore."""
    if ttl_seconds is None:
        return
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int)
        or not (settings.ttl_min_seconds <= ttl_seconds <= settings.ttl_max_seconds)
    ):
        raise InvalidTTL(f"ttl_seconds is out of range ({settings.ttl_min_seconds}..{settings.ttl_max_seconds})")


def expires_at_for(now: datetime, ttl_seconds: int | None) -> datetime | None:
    return None if ttl_seconds is None else now + timedelta(seconds=ttl_seconds)


# --- per-tenant default TTL --------------------------------------------------------------------
def _default_or_none(settings: Settings, seconds: int) -> int | None:
    """``0`` removes a default; anything else must pass the one TTL check."""
    if seconds == 0:
        return None
    check_ttl(settings, seconds)
    return seconds


def set_default_ttl(
    session: Session, tenant: str, *, settings: Settings, training: int | None = None, sampler: int | None = None
) -> Tenant:
    """Set a tenant's default TTL per kind (applied by the upload declare when the caller sends no
    ttl). ``tenant`` is an id or a name; ``None`` leaves a kind unchanged, ``0`` removes its default."""
    row = session.get(Tenant, tenant) or session.exec(select(Tenant).where(Tenant.name == tenant)).first()
    if row is None:
        raise NotFound(f"tenant {tenant} not found")
    if training is not None:
        row.default_ttl_training_seconds = _default_or_none(settings, training)
    if sampler is not None:
        row.default_ttl_sampler_seconds = _default_or_none(settings, sampler)
    session.add(row)
    return row


def tenant_default_ttl(session: Session, tenant_id: str, kind: str) -> int | None:
    """The TTL a new checkpoint of ``kind`` gets when none was asked for."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        return None
    return tenant.default_ttl_training_seconds if kind == "training" else tenant.default_ttl_sampler_seconds


# --- restore -----------------------------------------------------------------------------------
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
    checkpoint and blob rows are locked (PostgreSQL) so the collector cannot tombstone them
    meanwhile (rules G4, G8 in docs/design-gc.md).
    """
    principal.require_admin()
    ckpt = _lock_expired(session, checkpoint_id)
    check_ttl(settings, ttl_seconds)
    shas = sa.select(col(CheckpointFile.sha256)).where(col(CheckpointFile.checkpoint_id) == ckpt.id)
    _require_live_blobs(session, shas, checkpoint_id)
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
    ckpt.expires_at = expires_at_for(now, ttl_seconds)
    session.add(ckpt)
    session.execute(sa.update(Blob).where(col(Blob.sha256).in_(shas)).values(last_referenced_at=now))
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


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _lock_expired(session: Session, checkpoint_id: str) -> Checkpoint:
    """The checkpoint, row-locked on PostgreSQL; ``InvalidRequest`` unless it is ``expired``."""
    q = select(Checkpoint).where(Checkpoint.id == checkpoint_id)
    if _is_postgresql(session):
        q = q.with_for_update()
    ckpt = session.exec(q).first()
    if ckpt is None:
        raise NotFound(f"checkpoint {checkpoint_id} not found")
    if ckpt.state != CheckpointState.expired.value:
        raise InvalidRequest(f"checkpoint {checkpoint_id} is {ckpt.state}; only expired checkpoints can be restored")
    return ckpt


def _require_live_blobs(session: Session, shas: sa.Select[str], checkpoint_id: str) -> None:
    """Lock the checkpoint's blob rows (PostgreSQL) and refuse unless every one is ``live``."""
    q = sa.select(col(Blob.sha256), col(Blob.state)).where(col(Blob.sha256).in_(shas))
    if _is_postgresql(session):
        q = q.with_for_update()
    if any(state != BlobState.live.value for _, state in session.execute(q).all()):
        raise InvalidRequest(f"checkpoint {checkpoint_id} is already being collected")
