"""Retention rules: the one TTL check, per-tenant default TTLs, the trash bin and restore.

The trash bin (issue 12, part 4): a checkpoint is in the trash from the moment its ``expires_at``
passes, whether or not the collector's expire phase has run yet (state ``expired``, or still
``committed`` with a past ``expires_at``), until the collector releases it. Restore undoes the
expiry. The collector releases a checkpoint on its first run after ``expires_at + gc_grace_seconds``
(rule G4), and sweeps its blobs in that same pass (G5 counts from ``expires_at`` too), so a restore
is *guaranteed* to work until ``expires_at + grace`` and works in practice until that run, at the
latest ``expires_at + grace + gc_interval_seconds`` (plus the pass itself) while the collector runs
on schedule. ``TrashEntry`` carries both bounds. A restore brings the checkpoint's bytes back into its
tenant's usage, so it is held to the hard quota like a declare (``tenants.check_quota`` under the
tenant row lock), and it takes its run's lock first like every path that adds a checkpoint to a run
(``runs.lock_for_write``; lock order run, checkpoint, blobs, tenant).

Every function here is a catalog function: it takes the caller's ``session`` and never commits.
The collector *applies* retention (expire, release, sweep: ``weightstore_gc``); the rules it
applies live here and in ``checkpoints`` so that the API and the CLI need only the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore import audit
from weightstore.auth import Principal
from weightstore.billing import ledger
from weightstore.db import for_write
from weightstore.errors import AlreadyExists, InvalidRequest, InvalidTTL, NotFound
from weightstore.models import Blob, BlobState, Checkpoint, CheckpointFile, CheckpointState, Tenant, TrainingRun
from weightstore.names import TinkerPath
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


# --- trash and restore -------------------------------------------------------------------------
def _in_trash(now: datetime) -> sa.ColumnElement[bool]:
    """Expired (by the collector, or only by the clock: ``committed`` past ``expires_at``)."""
    return sa.or_(
        col(Checkpoint.state) == CheckpointState.expired.value,
        sa.and_(col(Checkpoint.state) == CheckpointState.committed.value, col(Checkpoint.expires_at) <= now),
    )


def _being_collected() -> sa.ColumnElement[bool]:
    """The checkpoint references a blob that is no longer ``live`` (tombstoned by the sweep)."""
    return sa.exists(
        sa.select(sa.literal(1))
        .select_from(CheckpointFile)
        .join(Blob, col(Blob.sha256) == col(CheckpointFile.sha256))
        .where(col(CheckpointFile.checkpoint_id) == col(Checkpoint.id), col(Blob.state) != BlobState.live.value)
    )


@dataclass(frozen=True)
class TrashEntry:
    """A checkpoint that ``restore_by_path`` can still bring back."""

    checkpoint_id: str
    tinker_path: str
    kind: str
    size_bytes: int
    expired_at: datetime
    """Its ``expires_at``: invisible (404) and no longer billed from then on."""
    restorable_until: datetime
    """Guaranteed bound: ``expired_at + gc_grace_seconds``; the collector never releases it earlier (G4)."""
    collected_by: datetime
    """When the collector, running every ``gc_interval_seconds``, will have released it and swept its
    bytes (``restorable_until + interval``, plus the pass itself). Past ``restorable_until`` a restore
    still works until that run: the trash lists whatever is not collected yet."""


def trash(session: Session, principal: Principal, *, now: datetime, settings: Settings) -> list[TrashEntry]:
    """What the caller's tenant can still restore, most recently expired first."""
    return trash_of(session, principal.tenant_id, now=now, settings=settings)


def trash_of(session: Session, tenant_id: str, *, now: datetime, settings: Settings) -> list[TrashEntry]:
    """Any tenant's trash, for callers that checked the right to read it (the admin UI)."""
    grace, interval = timedelta(seconds=settings.gc_grace_seconds), timedelta(seconds=settings.gc_interval_seconds)
    rows = session.exec(
        select(Checkpoint)
        .join(TrainingRun, col(TrainingRun.id) == col(Checkpoint.run_id))
        .where(
            Checkpoint.tenant_id == tenant_id,
            col(TrainingRun.deleted_at).is_(None),
            _in_trash(now),
            sa.not_(_being_collected()),
        )
        .order_by(col(Checkpoint.expires_at).desc(), col(Checkpoint.id))
    ).all()
    out = []
    for c in rows:
        assert c.expires_at is not None  # _in_trash: expired rows keep the expires_at that expired them
        out.append(
            TrashEntry(
                checkpoint_id=c.id,
                tinker_path=str(TinkerPath(c.run_id, c.kind, c.name)),
                kind=c.kind,
                size_bytes=c.size_bytes,
                expired_at=c.expires_at,
                restorable_until=c.expires_at + grace,
                collected_by=c.expires_at + grace + interval,
            )
        )
    return out


def restore_by_path(
    session: Session,
    principal: Principal,
    path: TinkerPath,
    *,
    settings: Settings,
    now: datetime,
    ttl_seconds: int | None = None,
    request_id: str | None = None,
) -> Checkpoint:
    """Restore the caller's checkpoint at ``path`` from the trash (the most recently expired one of
    that path). Tenant-scoped: another tenant's path answers ``NotFound`` like a missing one.

    A checkpoint still ``committed`` past its ``expires_at`` (the collector has not run yet) is
    first expired in this same transaction exactly as the expire phase would (state ``expired``,
    ledger ``end`` at ``expires_at``), then restored: the ledger reads the same whichever ran first."""
    principal.require_write()
    q = (
        select(Checkpoint)
        .join(TrainingRun, col(TrainingRun.id) == col(Checkpoint.run_id))
        .where(
            Checkpoint.tenant_id == principal.tenant_id,
            col(TrainingRun.deleted_at).is_(None),
            Checkpoint.run_id == path.run_id,
            Checkpoint.kind == path.kind,
            Checkpoint.name == path.name,
            _in_trash(now),
        )
        .order_by(col(Checkpoint.expires_at).desc(), col(Checkpoint.id))
    )
    found = session.exec(q).first()
    if found is None:
        raise NotFound(f"checkpoint {path} is not in the trash (never expired, already collected, or not yours)")
    return _restore(session, principal, found.id, settings=settings, now=now, ttl_seconds=ttl_seconds, request_id=request_id)


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
    """Admin restore by checkpoint id, any tenant (``POST /v1/admin/checkpoints/{id}/restore``)."""
    principal.require_admin()
    return _restore(session, principal, checkpoint_id, settings=settings, now=now, ttl_seconds=ttl_seconds, request_id=request_id)


def _restore(
    session: Session,
    principal: Principal,
    checkpoint_id: str,
    *,
    settings: Settings,
    now: datetime,
    ttl_seconds: int | None,
    request_id: str | None,
) -> Checkpoint:
    """``expired`` (or ``committed`` past ``expires_at``) → ``committed`` with a new expiry
    (``ttl_seconds`` from now; ``None`` = none).

    Refused once the checkpoint is released (``deleted``) or any of its blobs is not ``live``: the
    checkpoint and blob rows are locked (PostgreSQL) so the collector cannot tombstone them
    meanwhile (rules G4, G8 in docs/design-gc.md).
    """
    # runs and tenants import checkpoints, which imports this module: imported here, not at the top
    from weightstore import runs, tenants

    check_ttl(settings, ttl_seconds)
    target = session.get(Checkpoint, checkpoint_id)
    if target is None:
        raise NotFound(f"checkpoint {checkpoint_id} not found")
    runs.lock_for_write(session, target.tenant_id, target.run_id)
    ckpt = _lock_expired(session, checkpoint_id, now)
    shas = sa.select(col(CheckpointFile.sha256)).where(col(CheckpointFile.checkpoint_id) == ckpt.id)
    _require_live_blobs(session, shas, checkpoint_id)
    # in the trash its bytes are not counted (not visible): restoring adds them all back
    tenants.check_quota(session, ckpt.tenant_id, ckpt.size_bytes, now=now, lock=True)
    if ckpt.state == CheckpointState.committed.value:  # past expires_at; the expire phase has not run yet
        assert ckpt.expires_at is not None
        ckpt.state = CheckpointState.expired.value
        session.add(ckpt)
        session.flush()  # the partial unique index (S5) must not see two committed rows below
        ledger.on_end(session, ckpt, at=ckpt.expires_at, now=now)
    clash = session.exec(
        select(Checkpoint).where(
            Checkpoint.run_id == ckpt.run_id,
            Checkpoint.kind == ckpt.kind,
            Checkpoint.name == ckpt.name,
            Checkpoint.state == CheckpointState.committed.value,
            Checkpoint.id != ckpt.id,
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


def _lock_expired(session: Session, checkpoint_id: str, now: datetime) -> Checkpoint:
    """The checkpoint, row-locked on PostgreSQL; ``InvalidRequest`` unless it is in the trash."""
    q = for_write(select(Checkpoint).where(Checkpoint.id == checkpoint_id).execution_options(populate_existing=True))
    ckpt = session.exec(q).first()
    if ckpt is None:
        raise NotFound(f"checkpoint {checkpoint_id} not found")
    past_ttl = ckpt.expires_at is not None and ckpt.expires_at <= now
    if not (ckpt.state == CheckpointState.expired.value or (ckpt.state == CheckpointState.committed.value and past_ttl)):
        raise InvalidRequest(f"checkpoint {checkpoint_id} is {ckpt.state}; only expired checkpoints can be restored")
    return ckpt


def _require_live_blobs(session: Session, shas: sa.Select[str], checkpoint_id: str) -> None:
    """Lock the checkpoint's blob rows (PostgreSQL) and refuse unless every one is ``live``."""
    q = for_write(sa.select(col(Blob.sha256), col(Blob.state)).where(col(Blob.sha256).in_(shas)).order_by(col(Blob.sha256)))
    if any(state != BlobState.live.value for _, state in session.execute(q).all()):
        raise InvalidRequest(f"checkpoint {checkpoint_id} is already being collected")
