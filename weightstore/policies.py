"""Retention policies and pins: which checkpoints a policy keeps, which it expires at ``now``.

A policy is a run's own (``RetentionPolicy.run_id`` set) or its tenant's default (``run_id`` null);
a run's row replaces the tenant default *as a whole* (a run row with neither rule keeps everything,
opting the run out of the default). Per (run, kind), at ``now``, a checkpoint is kept when any of:

- it is pinned (pinning clears its ``expires_at``; see ``weightstore.checkpoints``);
- it is among the newest ``keep_last`` visible checkpoints of its kind — and the newest one is
  always kept, whatever the rules, so a run can always resume;
- ``keep_every`` is set and its ordinal is a multiple of it. The ordinal is the 1-based position in
  creation order (``created_at``, then id) among *every* checkpoint ever committed in (run, kind),
  expired and deleted ones included: it never shifts when others expire, so "every K-th" keeps the
  same checkpoints run after run. Checkpoint names are not parsed (they need not hold a step).

Everything else that is visible, unpinned and created at or before ``now`` is expired by the
collector's expire phase through the TTL path (``expires_at = now``, then ``checkpoints.expire_due``:
state ``expired``, ledger ``end`` at that instant, restorable until released).

Every function here is a catalog function: it takes the caller's ``session`` first and never commits.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from weightstore import audit, checkpoints
from weightstore.auth import Principal
from weightstore.billing import ledger
from weightstore.errors import InvalidRequest, NotFound
from weightstore.models import Checkpoint, CheckpointState, RetentionPolicy, Tenant, TrainingRun
from weightstore.names import TinkerPath, new_id
from weightstore.retention import check_ttl, expires_at_for
from weightstore.settings import Settings

MAX_RULE = 1_000_000
"""Upper bound for ``keep_last``/``keep_every``: larger values mean "keep everything" anyway."""
STREAM_ROWS = 5000
"""Checkpoint rows fetched at a time while evaluating policies: memory is one (run, kind) group."""


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy that applies to a run (or a tenant's default)."""

    scope: str
    """``run`` (the run's own row) or ``tenant`` (the tenant default)."""
    tenant_id: str
    run_id: str | None
    """``None`` for a tenant default."""
    keep_last: int | None
    keep_every: int | None
    updated_at: datetime

    @property
    def rule(self) -> str:
        parts = [
            f"keep_last={self.keep_last}" if self.keep_last else "",
            f"keep_every={self.keep_every}" if self.keep_every else "",
        ]
        return ", ".join(p for p in parts if p) or "keep all"

    @classmethod
    def of(cls, row: RetentionPolicy) -> EffectivePolicy:
        return cls(
            "run" if row.run_id is not None else "tenant",
            row.tenant_id,
            row.run_id,
            row.keep_last,
            row.keep_every,
            row.updated_at,
        )


@dataclass(frozen=True)
class PolicyExpiry:
    """One checkpoint a policy expires at ``now``, and why."""

    checkpoint_id: str
    tinker_path: str
    tenant_id: str
    size_bytes: int
    scope: str
    """Which policy: ``run`` or ``tenant`` (default)."""
    rule: str
    """The rule text and the checkpoint's place: ``keep_last=3: 4th newest of training; keep_every=5: #7``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "tinker_path": self.tinker_path,
            "tenant_id": self.tenant_id,
            "size_bytes": self.size_bytes,
            "policy": self.scope,
            "rule": self.rule,
        }


# --- setting policies --------------------------------------------------------------------------
def _check_rule(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= MAX_RULE):
        raise InvalidRequest(f"{name} must be an integer in 1..{MAX_RULE} (or absent)")


def _run_for(session: Session, principal: Principal, run_id: str) -> TrainingRun:
    """The run, if the caller's tenant owns it (an admin may name any run)."""
    run = session.get(TrainingRun, run_id)
    if run is None or run.deleted_at is not None or (run.tenant_id != principal.tenant_id and not principal.is_admin):
        raise NotFound(f"training run {run_id!r} not found")
    return run


def _tenant_for(session: Session, principal: Principal, tenant: str) -> Tenant:
    """The tenant (id or name). Decision: its default policy is set by an admin or by a trainer of
    that same tenant (it only ever expires that tenant's own checkpoints); readers may look."""
    row = session.get(Tenant, tenant) or session.exec(select(Tenant).where(Tenant.name == tenant)).first()
    if row is None or (row.id != principal.tenant_id and not principal.is_admin):
        raise NotFound(f"tenant {tenant} not found")
    return row


def _upsert(
    session: Session, *, tenant_id: str, run_id: str | None, keep_last: int | None, keep_every: int | None, now: datetime
) -> RetentionPolicy:
    _check_rule("keep_last", keep_last)
    _check_rule("keep_every", keep_every)
    for _ in range(2):  # a concurrent first insert wins the unique index: update its row instead
        row = _policy_row(session, tenant_id=tenant_id, run_id=run_id)
        if row is None:
            row = RetentionPolicy(id=new_id("rp"), tenant_id=tenant_id, run_id=run_id)
        row.keep_last, row.keep_every, row.updated_at = keep_last, keep_every, now
        try:
            with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError:
            continue
    raise InvalidRequest("retention policy changed concurrently; try again")


def _policy_row(session: Session, *, tenant_id: str, run_id: str | None) -> RetentionPolicy | None:
    q = select(RetentionPolicy).where(RetentionPolicy.tenant_id == tenant_id)
    q = q.where(col(RetentionPolicy.run_id).is_(None)) if run_id is None else q.where(RetentionPolicy.run_id == run_id)
    return session.exec(q).first()


def set_run_policy(
    session: Session,
    principal: Principal,
    run_id: str,
    *,
    keep_last: int | None,
    keep_every: int | None,
    now: datetime,
    request_id: str | None = None,
) -> EffectivePolicy:
    """The run's own policy (replaces the tenant default for this run; neither rule = keep all)."""
    principal.require_write()
    run = _run_for(session, principal, run_id)
    row = _upsert(session, tenant_id=run.tenant_id, run_id=run.id, keep_last=keep_last, keep_every=keep_every, now=now)
    _audit(session, principal, "retention.set", run.id, now, request_id, keep_last=keep_last, keep_every=keep_every)
    return EffectivePolicy.of(row)


def set_tenant_policy(
    session: Session,
    principal: Principal,
    tenant: str,
    *,
    keep_last: int | None,
    keep_every: int | None,
    now: datetime,
    request_id: str | None = None,
) -> EffectivePolicy:
    """The tenant's default policy: applies to each of its runs without a policy of its own."""
    principal.require_write()
    t = _tenant_for(session, principal, tenant)
    row = _upsert(session, tenant_id=t.id, run_id=None, keep_last=keep_last, keep_every=keep_every, now=now)
    _audit(session, principal, "retention.set", f"tenant:{t.id}", now, request_id, keep_last=keep_last, keep_every=keep_every)
    return EffectivePolicy.of(row)


def clear_run_policy(
    session: Session, principal: Principal, run_id: str, *, now: datetime, request_id: str | None = None
) -> EffectivePolicy | None:
    """Remove the run's own policy; returns what applies now (the tenant default, or ``None``)."""
    principal.require_write()
    run = _run_for(session, principal, run_id)
    session.execute(sa.delete(RetentionPolicy).where(col(RetentionPolicy.run_id) == run.id))
    _audit(session, principal, "retention.clear", run.id, now, request_id)
    return effective_for_runs(session, [run.id])[run.id]


def clear_tenant_policy(
    session: Session, principal: Principal, tenant: str, *, now: datetime, request_id: str | None = None
) -> None:
    principal.require_write()
    t = _tenant_for(session, principal, tenant)
    session.execute(
        sa.delete(RetentionPolicy).where(col(RetentionPolicy.tenant_id) == t.id, col(RetentionPolicy.run_id).is_(None))
    )
    _audit(session, principal, "retention.clear", f"tenant:{t.id}", now, request_id)


def _audit(
    session: Session, principal: Principal, action: str, target: str, now: datetime, request_id: str | None, **details: Any
) -> None:
    audit.record(
        session,
        at=now,
        action=action,
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=target,
        request_id=request_id,
        **details,
    )


# --- reading policies --------------------------------------------------------------------------
def run_policy(session: Session, principal: Principal, run_id: str) -> EffectivePolicy | None:
    """The policy in effect for a run the caller can see (its own, else its tenant's default)."""
    run = _run_for(session, principal, run_id)
    return effective_for_runs(session, [run.id])[run.id]


def tenant_policy(session: Session, principal: Principal, tenant: str) -> EffectivePolicy | None:
    t = _tenant_for(session, principal, tenant)
    row = _policy_row(session, tenant_id=t.id, run_id=None)
    return None if row is None else EffectivePolicy.of(row)


def list_policies(session: Session, principal: Principal) -> list[EffectivePolicy]:
    """Every policy row of the caller's tenant (an admin: of every tenant), tenant defaults first."""
    q = select(RetentionPolicy)
    if not principal.is_admin:
        q = q.where(RetentionPolicy.tenant_id == principal.tenant_id)
    rows = session.exec(q).all()
    return sorted((EffectivePolicy.of(r) for r in rows), key=lambda p: (p.tenant_id, p.run_id is not None, p.run_id or ""))


def effective_for_runs(session: Session, run_ids: Iterable[str]) -> dict[str, EffectivePolicy | None]:
    """The policy in effect for each run (two queries, whatever the count)."""
    wanted = sorted(set(run_ids))
    if not wanted:
        return {}
    tenants = dict(
        session.execute(sa.select(col(TrainingRun.id), col(TrainingRun.tenant_id)).where(col(TrainingRun.id).in_(wanted))).all()
    )
    rows = session.exec(
        select(RetentionPolicy).where(
            sa.or_(
                col(RetentionPolicy.run_id).in_(wanted),
                sa.and_(col(RetentionPolicy.run_id).is_(None), col(RetentionPolicy.tenant_id).in_(set(tenants.values()))),
            )
        )
    ).all()
    by_run = {r.run_id: r for r in rows if r.run_id is not None}
    by_tenant = {r.tenant_id: r for r in rows if r.run_id is None}
    out: dict[str, EffectivePolicy | None] = {}
    for run_id in wanted:
        row = by_run.get(run_id) or by_tenant.get(tenants.get(run_id, ""))
        out[run_id] = None if row is None else EffectivePolicy.of(row)
    return out


# --- pins --------------------------------------------------------------------------------------
def pin(session: Session, principal: Principal, path: TinkerPath, *, now: datetime, request_id: str | None = None) -> Checkpoint:
    """Never expire this checkpoint by policy or TTL. Clears its ``expires_at`` (recorded in the
    ledger as a TTL change: it is billed for as long as it is kept)."""
    principal.require_write()
    ckpt = checkpoints.get_for(session, principal, path, now=now)
    ckpt.pinned = True
    if ckpt.expires_at is not None:
        ckpt.expires_at = None
        session.add(ckpt)
        ledger.on_ttl(session, ckpt, now=now)
    session.add(ckpt)
    _audit(session, principal, "checkpoint.pin", str(path), now, request_id)
    return ckpt


def unpin(
    session: Session,
    principal: Principal,
    path: TinkerPath,
    *,
    settings: Settings,
    now: datetime,
    ttl_seconds: int | None = None,
    request_id: str | None = None,
) -> Checkpoint:
    """Make the checkpoint eligible for policy expiry again, and for TTL expiry when ``ttl_seconds``
    (from now) is given; its TTL from before the pin is not brought back."""
    principal.require_write()
    check_ttl(settings, ttl_seconds)
    ckpt = checkpoints.get_for(session, principal, path, now=now)
    ckpt.pinned = False
    if ttl_seconds is not None:
        ckpt.expires_at = expires_at_for(now, ttl_seconds)
        session.add(ckpt)
        ledger.on_ttl(session, ckpt, now=now)
    session.add(ckpt)
    _audit(session, principal, "checkpoint.unpin", str(path), now, request_id, ttl_seconds=ttl_seconds)
    return ckpt


# --- evaluation (the collector's expire phase) ---------------------------------------------------
def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def due_by_policy(session: Session, *, now: datetime) -> list[PolicyExpiry]:
    """The checkpoints the policies expire at ``now`` (see the module docstring for the rules),
    in (run, kind, creation) order. Reads only runs a policy covers, streamed group by group."""
    rows = session.exec(select(RetentionPolicy)).all()
    by_run = {r.run_id: r for r in rows if r.run_id is not None}
    by_tenant = {r.tenant_id: r for r in rows if r.run_id is None}
    if not rows:
        return []
    covered = sa.or_(
        col(Checkpoint.run_id).in_(list(by_run)) if by_run else sa.false(),
        col(Checkpoint.tenant_id).in_(list(by_tenant)) if by_tenant else sa.false(),
    )
    q = (
        sa.select(
            col(Checkpoint.id),
            col(Checkpoint.tenant_id),
            col(Checkpoint.run_id),
            col(Checkpoint.kind),
            col(Checkpoint.name),
            col(Checkpoint.size_bytes),
            col(Checkpoint.pinned),
            checkpoints.visible_clause(now).label("visible"),
        )
        .where(covered, col(Checkpoint.created_at) <= now)
        .order_by(col(Checkpoint.run_id), col(Checkpoint.kind), col(Checkpoint.created_at), col(Checkpoint.id))
        .execution_options(yield_per=STREAM_ROWS)
    )
    out: list[PolicyExpiry] = []
    for (run_id, kind), group in itertools.groupby(session.execute(q), key=lambda r: (r.run_id, r.kind)):
        members = list(group)
        row = by_run.get(run_id) or by_tenant.get(members[0].tenant_id)
        if row is None or (row.keep_last is None and row.keep_every is None):
            continue
        policy = EffectivePolicy.of(row)
        visible = [(i + 1, m) for i, m in enumerate(members) if m.visible]
        keep_last = max(policy.keep_last or 1, 1)
        for recency, (ordinal, m) in enumerate(reversed(visible), start=1):
            if m.pinned or recency <= keep_last or (policy.keep_every and ordinal % policy.keep_every == 0):
                continue
            why = [f"keep_last={keep_last}: {_ordinal(recency)} newest {kind}"]
            if policy.keep_every:
                why.append(f"keep_every={policy.keep_every}: #{ordinal} is not a multiple")
            out.append(
                PolicyExpiry(
                    m.id, str(TinkerPath(run_id, kind, m.name)), m.tenant_id, int(m.size_bytes), policy.scope, "; ".join(why)
                )
            )
    out.sort(key=lambda e: e.checkpoint_id)
    return out


def expire_by_policy(session: Session, checkpoint_ids: Sequence[str], *, now: datetime) -> list[str]:
    """Expire these checkpoints through the TTL path: ``expires_at = now`` for those still visible
    and unpinned (re-checked here, in the same transaction), then ``checkpoints.expire_due`` on
    exactly them (state ``expired``, ledger ``end`` at ``now``, blobs touched). Returns the ids expired."""
    ids = list(checkpoint_ids)
    if not ids:
        return []
    session.execute(
        sa.update(Checkpoint)
        .where(
            col(Checkpoint.id).in_(ids),
            col(Checkpoint.state) == CheckpointState.committed.value,
            sa.not_(col(Checkpoint.pinned)),
            sa.or_(col(Checkpoint.expires_at).is_(None), col(Checkpoint.expires_at) > now),
        )
        .values(expires_at=now)
    )
    return checkpoints.expire_due(session, now=now, limit=len(ids), ids=ids)
