"""Tenants as a resource: create, list, rename, price override, quotas, disable/enable, delete, and
the hard quota check that upload declares run.

Issue 12, parts 1 and 2.

Rules (docs/design.md, "Tenants and quotas"):

- A tenant's ``id`` is permanent (run-id namespaces, ledger rows and invoices name it); ``name`` is a
  display name that ``set`` may change. Every look-up here accepts either (``auth.find_tenant``).
- The operator tenant (``operator``, the bootstrap ``admin``) is not billed and can be neither
  disabled nor deleted; nor can a tenant that holds an active admin key (revoke those first), so no
  tenant change locks the operator out.
- ``disabled``: every key of the tenant is refused (``tenant_disabled``, 403) until ``enable``.
- ``delete`` is a state change like a checkpoint delete (S6): every stored checkpoint becomes
  ``deleted`` with a ledger ``end`` (at ``now``, or at ``expires_at`` when that came first, so billing
  is exact), expired ones in the trash become ``deleted`` too (no longer restorable), open uploads are
  aborted, unfinished export jobs cancelled, keys revoked, and the collector reclaims the bytes after
  the grace period. The row stays, ``state = deleted``: past invoices remain readable, and the name
  cannot be reused (a new tenant of that name would inherit its invoices).
- Quota (hard, on logical bytes): ``used`` = the sizes of the tenant's *visible* checkpoints (committed,
  not past ``expires_at``) plus every file size declared by its open, unexpired uploads. A declare
  is refused when ``used + requested - replaced > quota`` (``replaced``: the checkpoint an overwrite
  replaces). ``check_quota(lock=True)`` runs in the declare's recording transaction after locking the
  tenant row (``db.for_write``: ``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises
  writers), so concurrent declares re-read each other's reservations and never overshoot together. A
  declare that takes over reservations held elsewhere (the Hub's LFS carriers) locks the row first
  (``lock_quota``) and only then reads them, so two declares never both take the same bytes over.

Catalog functions only: the caller owns the transaction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore import audit
from weightstore.auth import Principal, find_tenant
from weightstore.billing import billable, ledger
from weightstore.checkpoints import visible_clause
from weightstore.db import for_write
from weightstore.errors import AlreadyExists, InvalidRequest, NotFound, TenantQuotaExceeded
from weightstore.models import (
    ApiKey,
    Blob,
    Checkpoint,
    CheckpointFile,
    CheckpointState,
    ExportJob,
    ExportJobState,
    Role,
    Tenant,
    TenantState,
    Upload,
    UploadFile,
    UploadState,
)
from weightstore.names import check_tenant_name

MAX_PRICE_USD: Final = 1_000_000.0
"""Highest price override accepted (USD per GB-month): a guard against a typo, not a business rule."""
MAX_QUOTA_BYTES: Final = 2**62
"""Fits a signed 64-bit column on both backends with room for sums."""
DELETE_BATCH: Final = 500
"""Checkpoints ended per statement batch by ``delete`` (bounded IN lists)."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()
"""``update`` leaves a field unchanged when given this (``None`` clears an optional field)."""


@dataclass(frozen=True)
class TenantUsage:
    """What counts against a tenant's quota, in logical bytes (dedup is not subtracted)."""

    stored_bytes: int
    """Sizes of its visible checkpoints."""
    reserved_bytes: int
    """Declared by its open, unexpired uploads (they become checkpoints at commit)."""

    @property
    def used_bytes(self) -> int:
        return self.stored_bytes + self.reserved_bytes


@dataclass(frozen=True)
class DeleteResult:
    tenant: Tenant
    checkpoints_deleted: int
    keys_revoked: int
    uploads_aborted: int
    exports_cancelled: int


# --- validation ----------------------------------------------------------------------------------
def check_price(value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest("price_per_gb_month_usd must be a finite number")
    if not 0 <= value <= MAX_PRICE_USD:
        raise InvalidRequest(f"price_per_gb_month_usd must be between 0 and {MAX_PRICE_USD:.0f} USD per GB-month ({value} given)")
    return float(value)


def check_quota_value(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_QUOTA_BYTES:
        raise InvalidRequest(f"{field} must be a whole number of bytes between 0 and {MAX_QUOTA_BYTES} ({value!r} given)")
    return value


def _check_soft_below_hard(quota: int | None, soft: int | None) -> None:
    if quota is not None and soft is not None and soft > quota:
        raise InvalidRequest(f"soft_quota_bytes ({soft}) must not exceed quota_bytes ({quota})")


# --- reads ---------------------------------------------------------------------------------------
def get(session: Session, ref: str) -> Tenant:
    """The tenant with id or name ``ref`` (deleted ones included)."""
    tenant = find_tenant(session, ref)
    if tenant is None:
        raise NotFound(f"tenant {ref} not found")
    return tenant


def list_tenants(session: Session, *, include_deleted: bool = True) -> list[Tenant]:
    q = select(Tenant).order_by(col(Tenant.id))
    if not include_deleted:
        q = q.where(col(Tenant.state) != TenantState.deleted.value)
    return list(session.exec(q).all())


def billed_tenant_ids(session: Session) -> set[str]:
    """Tenants that appear on the billing overview: every tenant except operator tenants (the rule
    lives in ``weightstore.billing.billable``)."""
    return billable.billed_tenant_ids(session)


def usage(session: Session, tenant_id: str, *, now: datetime) -> TenantUsage:
    return usage_all(session, now=now, tenant_ids=[tenant_id]).get(tenant_id, TenantUsage(0, 0))


def usage_all(session: Session, *, now: datetime, tenant_ids: Sequence[str] | None = None) -> dict[str, TenantUsage]:
    """Quota usage per tenant (two grouped statements; tenants with nothing stored are absent)."""
    stored_q = (
        select(col(Checkpoint.tenant_id), sa.func.coalesce(sa.func.sum(col(Checkpoint.size_bytes)), 0))
        .where(visible_clause(now))
        .group_by(col(Checkpoint.tenant_id))
    )
    reserved_q = (
        select(col(Upload.tenant_id), sa.func.coalesce(sa.func.sum(col(UploadFile.size_bytes)), 0))
        .join(UploadFile, col(UploadFile.upload_id) == col(Upload.id))
        .where(col(Upload.state) == UploadState.open.value, col(Upload.expires_at) > now)
        .group_by(col(Upload.tenant_id))
    )
    if tenant_ids is not None:
        stored_q = stored_q.where(col(Checkpoint.tenant_id).in_(tenant_ids))
        reserved_q = reserved_q.where(col(Upload.tenant_id).in_(tenant_ids))
    stored = {t: int(n) for t, n in session.exec(stored_q).all()}
    reserved = {t: int(n) for t, n in session.exec(reserved_q).all()}
    return {t: TenantUsage(stored.get(t, 0), reserved.get(t, 0)) for t in sorted(set(stored) | set(reserved))}


def lock_quota(session: Session, tenant_id: str) -> int | None:
    """Lock the tenant's row until the transaction ends (``db.for_write``; on SQLite the transaction
    already holds the write lock) and answer its hard quota (None: unlimited, or no such tenant).
    Whatever a declare counts against the quota (its usage, and reservations it takes over:
    ``uploads.Handover``) must be read after this, in the same transaction, or a concurrent declare
    can change it unseen."""
    return session.exec(for_write(select(Tenant.quota_bytes).where(Tenant.id == tenant_id))).first()


def check_quota(session: Session, tenant_id: str, requested: int, *, now: datetime, replaced: int = 0, lock: bool) -> None:
    """Refuse (``quota_exceeded``, 400) a declare of ``requested`` logical bytes that would take the
    tenant past its hard quota; ``replaced`` is the size of the checkpoint an overwrite ends.

    With ``lock`` the tenant row is locked first (``db.for_write``; on SQLite the transaction already
    holds the write lock), so the usage read here includes every declare recorded before and none
    can be recorded until this transaction ends: call it in the transaction that records the upload."""
    if lock:
        quota = lock_quota(session, tenant_id)
    else:
        quota = session.exec(select(Tenant.quota_bytes).where(Tenant.id == tenant_id)).first()
    if quota is None:
        return
    used = usage(session, tenant_id, now=now).used_bytes
    if used - replaced + requested > quota:
        raise TenantQuotaExceeded(
            f"tenant {tenant_id} quota exceeded: {used} bytes used + {requested} requested"
            + (f" - {replaced} replaced" if replaced else "")
            + f" > {quota} bytes limit (delete checkpoints or ask an admin to raise the quota)",
            used_bytes=used,
            requested_bytes=requested,
            replaced_bytes=replaced,
            quota_bytes=quota,
        )


# --- writes --------------------------------------------------------------------------------------
def _check_name_free(session: Session, name: str, *, besides: str | None = None) -> None:
    other = find_tenant(session, name)
    if other is not None and other.id != besides:
        gone = " (a deleted tenant keeps its name so its invoices stay readable)" if other.state == TenantState.deleted else ""
        raise AlreadyExists(f"tenant {name} already exists{gone}")


def _actor(principal: Principal | None) -> str | None:
    return None if principal is None else principal.key_id


def create(
    session: Session,
    name: str,
    *,
    now: datetime,
    principal: Principal | None = None,
    price_per_gb_month_usd: float | None = None,
    quota_bytes: int | None = None,
    soft_quota_bytes: int | None = None,
) -> Tenant:
    """A new active tenant whose id and name are ``name``."""
    check_tenant_name(name)
    price = check_price(price_per_gb_month_usd)
    quota = check_quota_value("quota_bytes", quota_bytes)
    soft = check_quota_value("soft_quota_bytes", soft_quota_bytes)
    _check_soft_below_hard(quota, soft)
    _check_name_free(session, name)
    tenant = Tenant(
        id=name,
        name=name,
        created_at=now,
        price_per_gb_month_usd=price,
        quota_bytes=quota,
        soft_quota_bytes=soft,
        state=TenantState.active.value,
    )
    session.add(tenant)
    session.flush()
    audit.record(session, at=now, action="tenant.create", tenant_id=tenant.id, key_id=_actor(principal), target=tenant.id)
    return tenant


def update(
    session: Session,
    ref: str,
    *,
    now: datetime,
    principal: Principal | None = None,
    name: str | _Unset = UNSET,
    price_per_gb_month_usd: float | None | _Unset = UNSET,
    quota_bytes: int | None | _Unset = UNSET,
    soft_quota_bytes: int | None | _Unset = UNSET,
) -> Tenant:
    """Change the display name, price override or quotas; ``UNSET`` leaves one, ``None`` clears one.
    Lowering a quota below what is stored deletes nothing: only new declares are refused."""
    tenant = get(session, ref)
    if tenant.state == TenantState.deleted:
        raise InvalidRequest(f"tenant {tenant.id} was deleted: it cannot be changed")
    changed: dict[str, Any] = {}  # audit details: str, float, int or None
    if not isinstance(name, _Unset) and name != tenant.name:
        check_tenant_name(name)
        _check_name_free(session, name, besides=tenant.id)
        tenant.name = changed["name"] = name
    if not isinstance(price_per_gb_month_usd, _Unset):
        tenant.price_per_gb_month_usd = changed["price_per_gb_month_usd"] = check_price(price_per_gb_month_usd)
    if not isinstance(quota_bytes, _Unset):
        tenant.quota_bytes = changed["quota_bytes"] = check_quota_value("quota_bytes", quota_bytes)
    if not isinstance(soft_quota_bytes, _Unset):
        tenant.soft_quota_bytes = changed["soft_quota_bytes"] = check_quota_value("soft_quota_bytes", soft_quota_bytes)
    _check_soft_below_hard(tenant.quota_bytes, tenant.soft_quota_bytes)
    session.add(tenant)
    session.flush()
    audit.record(
        session, at=now, action="tenant.update", tenant_id=tenant.id, key_id=_actor(principal), target=tenant.id, **changed
    )
    return tenant


def _refuse_lockout(session: Session, tenant: Tenant, action: str) -> None:
    if tenant.operator:
        raise InvalidRequest(f"tenant {tenant.id} is the operator tenant: it cannot be {action}")
    admin_keys = session.exec(
        select(sa.func.count())
        .select_from(ApiKey)
        .where(ApiKey.tenant_id == tenant.id, ApiKey.role == Role.admin.value, col(ApiKey.revoked_at).is_(None))
    ).one()
    if admin_keys:
        raise InvalidRequest(f"tenant {tenant.id} holds {admin_keys} active admin key(s): revoke them before it can be {action}")


def set_state(session: Session, ref: str, state: TenantState, *, now: datetime, principal: Principal | None = None) -> Tenant:
    """Disable or enable a tenant (idempotent). A deleted tenant stays deleted."""
    if state not in (TenantState.active, TenantState.disabled):
        raise InvalidRequest("a tenant is enabled (active) or disabled here; use delete to delete it")
    tenant = get(session, ref)
    if tenant.state == TenantState.deleted:
        raise InvalidRequest(
            f"tenant {tenant.id} was deleted: it cannot be {'enabled' if state == TenantState.active else 'disabled'}"
        )
    if state == TenantState.disabled:
        _refuse_lockout(session, tenant, "disabled")
    if tenant.state != state:
        tenant.state = state.value
        session.add(tenant)
        session.flush()
        action = "tenant.enable" if state == TenantState.active else "tenant.disable"
        audit.record(session, at=now, action=action, tenant_id=tenant.id, key_id=_actor(principal), target=tenant.id)
    return tenant


def delete(session: Session, ref: str, *, now: datetime, principal: Principal | None = None) -> DeleteResult:
    """Delete a tenant (module doc): its checkpoints end exactly, keys are revoked, the row stays."""
    tenant = get(session, ref)
    if tenant.state == TenantState.deleted:
        return DeleteResult(tenant, 0, 0, 0, 0)
    _refuse_lockout(session, tenant, "deleted")
    tid = tenant.id
    stored = (CheckpointState.committed.value, CheckpointState.expired.value)
    rows = session.exec(
        select(Checkpoint.id, Checkpoint.state).where(Checkpoint.tenant_id == tid, col(Checkpoint.state).in_(stored))
    ).all()
    for start in range(0, len(rows), DELETE_BATCH):
        batch = rows[start : start + DELETE_BATCH]
        ids = [i for i, _ in batch]
        # committed ones still accrue: one ledger ``end`` each (at now, or at expires_at if earlier);
        # expired ones already got theirs from the collector
        ledger.on_end_expired(session, [i for i, s in batch if s == CheckpointState.committed], now=now, at=now)
        session.execute(
            sa.update(Checkpoint).where(col(Checkpoint.id).in_(ids)).values(state=CheckpointState.deleted.value, deleted_at=now)
        )
        shas = sa.select(col(CheckpointFile.sha256)).where(col(CheckpointFile.checkpoint_id).in_(ids))
        session.execute(sa.update(Blob).where(col(Blob.sha256).in_(shas)).values(last_referenced_at=now))
    uploads = session.execute(
        sa.update(Upload)
        .where(col(Upload.tenant_id) == tid, col(Upload.state) == UploadState.open.value)
        .values(state=UploadState.aborted.value)
    ).rowcount  # type: ignore[attr-defined]  # a DML result is a CursorResult (docs/design.md)
    exports = session.execute(
        sa.update(ExportJob)
        .where(col(ExportJob.tenant_id) == tid, col(ExportJob.state).in_([s.value for s in ExportJobState.active()]))
        .values(
            state=ExportJobState.cancelled.value,
            finished_at=now,
            lease_expires_at=None,
            error={"code": "cancelled", "message": "tenant deleted"},
        )
    ).rowcount  # type: ignore[attr-defined]
    keys = session.execute(
        sa.update(ApiKey).where(col(ApiKey.tenant_id) == tid, col(ApiKey.revoked_at).is_(None)).values(revoked_at=now)
    ).rowcount  # type: ignore[attr-defined]
    tenant.state = TenantState.deleted.value
    session.add(tenant)
    session.flush()
    result = DeleteResult(tenant, len(rows), int(keys), int(uploads), int(exports))
    audit.record(
        session,
        at=now,
        action="tenant.delete",
        tenant_id=tid,
        key_id=_actor(principal),
        target=tid,
        checkpoints=result.checkpoints_deleted,
        keys=result.keys_revoked,
        uploads=result.uploads_aborted,
        exports=result.exports_cancelled,
    )
    return result
