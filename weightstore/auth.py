"""Tenants, hashed ``tml-`` API keys, roles, and the authenticated ``Principal`` a request acts as.

Keys look like ``tml-<43 url-safe chars>`` (the Tinker SDK refuses keys without the ``tml-``
prefix). Only their sha256 is stored: 256 random bits make a slow KDF pointless, and a constant-
time lookup by hash keeps authentication one indexed query.

``revoke_key`` is the one place that decides who may revoke which key (roles matrix in its docstring
and in docs/design.md); the HTTP API and the CLI both reach it through ``DELETE /v1/keys/{id}``.
``rotate_key`` (``POST /v1/keys/{id}/rotate``) follows the same rules: whoever may revoke a key may
replace it. A rotated key keeps working for its grace period: ``revoked_at`` is then in the future,
and a key authenticates until ``revoked_at`` has passed.

``bootstrap_admin`` makes the operator tenant and the first admin key, once per catalog however many
processes run it at the same moment (a PostgreSQL advisory lock; SQLite's ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from weightstore import uisessions
from weightstore.db import for_write
from weightstore.errors import AlreadyExists, AuthenticationFailed, Forbidden, InvalidRequest, NotFound, TenantDisabled
from weightstore.models import ApiKey, Role, Tenant, TenantState
from weightstore.names import check_tenant_name, new_id

KEY_PREFIX = "tml-"
OPERATOR_TENANT = "admin"
"""The operator's own tenant, made by the bootstrap (``operator=True``: never billed)."""
BOOTSTRAP_KEY_NAME = "bootstrap"
"""Name of the admin keys the bootstrap makes; ``--rotate`` replaces the active ones."""
MAX_ROTATION_GRACE_SECONDS = 30 * 24 * 3600
"""A rotated key works at most this long after rotation: long enough for any redeploy."""
BOOTSTRAP_LOCK_ID = 0x77735F626F6F74  # "ws_boot": pg_advisory_xact_lock key, one per deployment
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
    """The tenant ``name``, created if missing. Race-free: two transactions creating the same
    tenant at once both succeed (``INSERT ... ON CONFLICT DO NOTHING``, then read), where a
    check-then-insert let the second one fail on the primary key (issue 13, found 1)."""
    check_tenant_name(name)
    tenant = find_tenant(session, name)
    if tenant is None:
        values = Tenant(id=name, name=name, created_at=now, operator=operator).model_dump()
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(insert(Tenant).values(**values).on_conflict_do_nothing())
        tenant = find_tenant(session, name)
        if tenant is None:  # the conflict was on the name, held by a tenant with another id
            raise AlreadyExists(f"tenant name {name!r} is taken")
    return tenant


def create_key(
    session: Session,
    *,
    tenant: str,
    role: str,
    now: datetime,
    name: str | None = None,
    create_tenant: bool = True,
    plaintext: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for ``tenant`` (id or name). Returns the row and the plaintext key, which is
    shown once and never stored. A missing tenant is created only with ``create_tenant`` (the HTTP
    API and the CLI default to False, so a typo never makes a tenant); a deleted one never gets keys.
    ``plaintext`` installs a key the operator chose (``WEIGHTSTORE_INITIAL_ADMIN_KEY``) instead of a
    random one; a key ever used before, even revoked, is refused."""
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
    if plaintext is None:
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    elif session.exec(select(ApiKey.id).where(ApiKey.key_hash == hash_key(plaintext))).first() is not None:
        raise AlreadyExists("this API key is (or was) in use already: choose a new one")
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
    if row.revoked_at is not None and row.revoked_at <= now:
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
    Revoking an already revoked key changes nothing; revoking a rotated key still in its grace
    period ends the grace now. The key's admin UI sessions end with it.
    """
    row = _key_for_revocation(session, key_id=key_id, principal=principal, verb="revoke")
    if row.revoked_at is not None and row.revoked_at <= now:
        return row
    if row.revoked_at is None and Role(row.role) == Role.admin and not _other_active_admin_keys(session, besides=row.id):
        raise InvalidRequest("this is the last active admin key of the deployment: create another admin key before revoking it")
    row.revoked_at = now
    session.add(row)
    uisessions.end_for_key(session, row.id, now=now)
    session.flush()
    return row


def _key_for_revocation(session: Session, *, key_id: str, principal: Principal, verb: str) -> ApiKey:
    """The key ``principal`` may revoke (or rotate, which revokes it), by the rules of ``revoke_key``."""
    row = session.get(ApiKey, key_id)
    if row is None or (row.tenant_id != principal.tenant_id and not principal.is_admin):
        raise NotFound(f"key {key_id} not found")
    target_role = Role(row.role)
    if row.id != principal.key_id and not principal.is_admin:
        if principal.role == Role.reader:
            raise Forbidden(f"a reader key can {verb} only itself")
        if ROLE_RANK[target_role] > ROLE_RANK[principal.role]:
            raise Forbidden(f"a {principal.role} key cannot {verb} a {target_role} key")
    return row


def rotate_key(
    session: Session, *, key_id: str, principal: Principal, now: datetime, grace_seconds: int = 0
) -> tuple[ApiKey, str, ApiKey]:
    """Replace ``key_id`` by a new key of the same tenant, role and name; the old key stops working
    ``grace_seconds`` from now (0: at once). Who may rotate a key: whoever may revoke it
    (``revoke_key``'s rules). Only an active key is rotated (a revoked or already rotated one is
    ``invalid_request``: rotating twice would leave two keys). Returns (new row, its plaintext
    shown once, old row). The old key's admin UI sessions end at once: the grace is for API clients."""
    if not 0 <= grace_seconds <= MAX_ROTATION_GRACE_SECONDS:
        raise InvalidRequest(f"grace must be between 0 and {MAX_ROTATION_GRACE_SECONDS} seconds")
    old = _key_for_revocation(session, key_id=key_id, principal=principal, verb="rotate")
    # Lock the row (PostgreSQL; SQLite serialises writers) so two rotations of one key make one new key.
    session.exec(for_write(select(ApiKey.id).where(ApiKey.id == old.id))).first()
    session.refresh(old)
    if old.revoked_at is not None:
        raise InvalidRequest(f"key {key_id} is revoked or already rotated: there is nothing to rotate")
    new, plaintext = create_key(session, tenant=old.tenant_id, role=old.role, now=now, name=old.name, create_tenant=False)
    old.revoked_at = now + timedelta(seconds=grace_seconds)
    session.add(old)
    uisessions.end_for_key(session, old.id, now=now)
    session.flush()
    return new, plaintext, old


def _other_active_admin_keys(session: Session, *, besides: str) -> list[str]:
    """Active admin keys other than ``besides``, locked (``db.for_write`` on PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` already serialises writers) so that two admins revoking each other at once
    cannot both see the other one remaining: the second re-reads after the first commits."""
    q = for_write(
        select(ApiKey.id).where(ApiKey.role == Role.admin.value, col(ApiKey.revoked_at).is_(None)).order_by(col(ApiKey.id))
    )
    return [k for k in session.exec(q) if k != besides]


def list_keys(session: Session, *, tenant_id: str | None) -> list[ApiKey]:
    q = select(ApiKey).order_by(col(ApiKey.created_at))
    if tenant_id is not None:
        q = q.where(ApiKey.tenant_id == tenant_id)
    return list(session.exec(q))


@dataclass(frozen=True)
class Bootstrapped:
    """What ``bootstrap_admin`` did."""

    key_id: str | None
    """The admin key made now; None when an admin key existed and nothing was made."""
    api_key: str | None
    """Its plaintext when generated here (shown once); None when none was made or the operator
    provided it (``initial_key``: they have it already, it is never echoed)."""
    revoked: tuple[str, ...] = ()
    """Bootstrap keys replaced by ``rotate`` (revoked at once)."""


def lock_bootstrap(session: Session) -> None:
    """Serialise bootstraps of one catalog until this transaction ends: a PostgreSQL transaction-level
    advisory lock. SQLite needs none: ``BEGIN IMMEDIATE`` already holds the write lock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(BOOTSTRAP_LOCK_ID)))


def has_admin_key(session: Session, *, now: datetime) -> bool:
    """Is there an admin key that authenticates now (active, or rotated and still in its grace)?"""
    q = select(ApiKey.id).where(
        ApiKey.role == Role.admin.value, sa.or_(col(ApiKey.revoked_at).is_(None), col(ApiKey.revoked_at) > now)
    )
    return session.exec(q).first() is not None


def bootstrap_admin(
    session: Session, *, now: datetime, initial_key: str | None = None, rotate: bool = False, tenant: str = OPERATOR_TENANT
) -> Bootstrapped:
    """Make the operator tenant and the first admin key (named ``bootstrap``) unless an admin key
    exists; idempotent and race-free: any number of processes may run it at once on one catalog
    (``lock_bootstrap``), exactly one makes the key (issue 13, found 1).

    ``initial_key``: install this operator-provided key instead of generating one. ``rotate``:
    even when an admin key exists, make a new bootstrap key and revoke the active ones named
    ``bootstrap`` (the way back in when the bootstrap key is lost or leaked)."""
    lock_bootstrap(session)
    if not rotate and has_admin_key(session, now=now):
        return Bootstrapped(key_id=None, api_key=None)
    if rotate and initial_key is not None:
        row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(initial_key))).first()
        if row is not None:
            raise AlreadyExists(f"WEIGHTSTORE_INITIAL_ADMIN_KEY is (or was) key {row.id}: set a new key to rotate to")
    ensure_tenant(session, tenant, now=now, operator=True)  # the operator's own tenant: not billed
    replaced = session.exec(
        select(ApiKey).where(
            ApiKey.tenant_id == tenant,
            ApiKey.name == BOOTSTRAP_KEY_NAME,
            ApiKey.role == Role.admin.value,
            col(ApiKey.revoked_at).is_(None),
        )
    ).all()
    row, plaintext = create_key(
        session, tenant=tenant, role=Role.admin.value, now=now, name=BOOTSTRAP_KEY_NAME, plaintext=initial_key
    )
    for old in replaced:
        old.revoked_at = now
        session.add(old)
        uisessions.end_for_key(session, old.id, now=now)
    session.flush()
    return Bootstrapped(
        key_id=row.id, api_key=None if initial_key is not None else plaintext, revoked=tuple(sorted(o.id for o in replaced))
    )


__all__ = [
    "AlreadyExists",
    "Bootstrapped",
    "Principal",
    "authenticate",
    "bootstrap_admin",
    "has_admin_key",
    "lock_bootstrap",
    "create_key",
    "ensure_tenant",
    "find_tenant",
    "hash_key",
    "list_keys",
    "revoke_key",
    "rotate_key",
]
