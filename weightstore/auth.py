"""Tenants, hashed ``tml-`` API keys, roles, and the authenticated ``Principal`` a request acts as.

Keys look like ``tml-<43 url-safe chars>`` (the Tinker SDK refuses keys without the ``tml-``
prefix). Only their sha256 is stored: 256 random bits make a slow KDF pointless, and a constant-
time lookup by hash keeps authentication one indexed query.

``revoke_key`` is the one place that decides who may revoke which key (roles matrix in its docstring
and in docs/design.md); the HTTP API and the CLI both reach it through ``DELETE /v1/keys/{id}``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from weightstore import uisessions
from weightstore.errors import AlreadyExists, AuthenticationFailed, Forbidden, InvalidRequest, NotFound, TenantDisabled
from weightstore.models import ApiKey, Role, Tenant, TenantState
from weightstore.names import check_tenant_name, new_id

KEY_PREFIX = "tml-"
# Roles that may write (create runs, upload, delete, set TTL, export).
WRITE_ROLES = {Role.trainer, Role.admin}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    tenant_id: str
    key_id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin

    def require_write(self) -> None:
        if self.role not in WRITE_ROLES:
            raise Forbidden(f"a {self.role} key cannot modify anything")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this needs an admin key")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def find_tenant(session: Session, ref: str) -> Tenant | None:
    """The tenant whose id is ``ref``, else whose (display) name is ``ref``."""
    return session.get(Tenant, ref) or session.exec(select(Tenant).where(Tenant.name == ref)).first()


def ensure_tenant(session: Session, name: str, *, now: datetime, operator: bool = False) -> Tenant:
    check_tenant_name(name)
    tenant = find_tenant(session, name)
    if tenant is None:
        tenant = Tenant(id=name, name=name, created_at=now, operator=operator)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(
    session: Session, *, tenant: str, role: str, now: datetime, name: str | None = None, create_tenant: bool = True
) -> tuple[ApiKey, str]:
    """Create a key for ``tenant`` (id or name). Returns the row and the plaintext key, which is
    shown once and never stored. A missing tenant is created only with ``create_tenant`` (the HTTP
    API and the CLI default to False, so a typo never makes a tenant); a deleted one never gets keys."""
    try:
        role_enum = Role(role)
    except ValueError as exc:
        raise InvalidRequest(f"role must be one of {', '.join(r.value for r in Role)}") from exc
    existing = find_tenant(session, tenant)
    if existing is None and not create_tenant:
        raise NotFound(
            f"tenant {tenant!r} does not exist: create it first (weightstore tenants create {tenant}) "
            "or pass --create-tenant (API: create_tenant: true)"
        )
    if existing is not None and existing.state == TenantState.deleted:
        raise InvalidRequest(f"tenant {tenant!r} was deleted: it cannot get new keys")
    t = existing or ensure_tenant(session, tenant, now=now)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        tenant_id=t.id,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:10],
        role=role_enum.value,
        name=name,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate(session: Session, key: str | None, *, now: datetime) -> Principal:
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        raise AuthenticationFailed("missing or malformed API key (expected X-API-Key: tml-...)")
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    if row is None:
        raise AuthenticationFailed("unknown API key")
    if row.revoked_at is not None:
        raise AuthenticationFailed("this API key has been revoked")
    state = session.exec(select(Tenant.state).where(Tenant.id == row.tenant_id)).first()
    if state != TenantState.active:
        raise TenantDisabled(f"tenant {row.tenant_id} is {state or 'missing'}: its keys are refused until an admin enables it")
    return Principal(tenant_id=row.tenant_id, key_id=row.id, role=Role(row.role))


ROLE_RANK: dict[Role, int] = {Role.reader: 0, Role.trainer: 1, Role.admin: 2}
"""Key revocation compares roles by this rank: a key never revokes a key above its own role."""


def revoke_key(session: Session, *, key_id: str, principal: Principal, now: datetime) -> ApiKey:
    """Revoke ``key_id`` as ``principal``: the one place that decides who may revoke which key.

    - A key of another tenant is ``not_found`` to a non-admin (the same answer as a missing key).
    - Any key may revoke itself (whoever holds a leaked key can at least kill it).
    - A reader revokes nothing else; a trainer revokes trainer and reader keys of its own tenant,
      never an admin key (``forbidden``); an admin revokes any key of any tenant.
    - Nobody revokes the last active admin key of the deployment, not even with itself
      (``invalid_request``): revoking the admin key in use is fine while another one remains.
    Revoking an already revoked key changes nothing. The key's admin UI sessions end with it.
    """
    row = session.get(ApiKey, key_id)
    if row is None or (row.tenant_id != principal.tenant_id and not principal.is_admin):
        raise NotFound(f"key {key_id} not found")
    target_role = Role(row.role)
    if row.id != principal.key_id and not principal.is_admin:
        if principal.role == Role.reader:
            raise Forbidden("a reader key can revoke only itself")
        if ROLE_RANK[target_role] > ROLE_RANK[principal.role]:
            raise Forbidden(f"a {principal.role} key cannot revoke a {target_role} key")
    if row.revoked_at is not None:
        return row
    if target_role == Role.admin and not _other_active_admin_keys(session, besides=row.id):
        raise InvalidRequest("this is the last active admin key of the deployment: create another admin key before revoking it")
    row.revoked_at = now
    session.add(row)
    uisessions.end_for_key(session, row.id, now=now)
    session.flush()
    return row


def _other_active_admin_keys(session: Session, *, besides: str) -> list[str]:
    """Active admin keys other than ``besides``, locked (``FOR UPDATE`` on PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` already serialises writers) so that two admins revoking each other at once
    cannot both see the other one remaining: the second re-reads after the first commits."""
    q = (
        select(ApiKey.id)
        .where(ApiKey.role == Role.admin.value, col(ApiKey.revoked_at).is_(None))
        .order_by(col(ApiKey.id))
        .with_for_update()
    )
    return [k for k in session.exec(q) if k != besides]


def list_keys(session: Session, *, tenant_id: str | None) -> list[ApiKey]:
    q = select(ApiKey).order_by(col(ApiKey.created_at))
    if tenant_id is not None:
        q = q.where(ApiKey.tenant_id == tenant_id)
    return list(session.exec(q))


def bootstrap_admin(session: Session, *, now: datetime, tenant: str = "admin") -> str | None:
    """Create the first admin key if no admin key exists; returns it (once) or None."""
    exists = session.exec(select(ApiKey).where(ApiKey.role == Role.admin.value, col(ApiKey.revoked_at).is_(None))).first()
    if exists is not None:
        return None
    ensure_tenant(session, tenant, now=now, operator=True)  # the operator's own tenant: not billed
    _, plaintext = create_key(session, tenant=tenant, role=Role.admin.value, now=now, name="bootstrap")
    return plaintext


__all__ = [
    "AlreadyExists",
    "Principal",
    "authenticate",
    "bootstrap_admin",
    "create_key",
    "ensure_tenant",
    "find_tenant",
    "hash_key",
    "list_keys",
    "revoke_key",
]
