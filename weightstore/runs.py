"""Training runs: create, fetch (tenant-scoped: another tenant's run is "not found"), list.

Run ids are global, because a ``tinker://RUN/...`` path names a published checkpoint for every
tenant and must stay unambiguous. So that no run-id operation answers differently for "another
tenant holds it" and "nobody holds it" (issue 11, item 1), a tenant can only ever create ids in
its own namespace, decided from the id and the caller alone (``claim_run_id``):

- no id: the server mints ``{uuid4}:train:0`` (Tinker's shape; unguessable, never collides);
- ``{session}:train:{n}`` where ``session`` is one of the caller's Tinker sessions (server-minted
  UUIDs): kept as asked (``load_weights``, ``copy_weights`` with a session);
- ``{tenant}:...`` with the caller's own tenant: kept as asked;
- anything else is placed in the caller's namespace: ``{tenant}:{asked}``.

``already_exists`` can then only mean "your tenant holds it". Tenant names are never UUID-shaped
(``names.check_tenant_name``), so the namespaces cannot overlap.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.auth import Principal
from weightstore.errors import AlreadyExists, InvalidRequest, NotFound
from weightstore.formats import check_user_metadata
from weightstore.models import TinkerSession, TrainingRun
from weightstore.names import check_run_id

SESSION_MODEL_RE = re.compile(r"^(?P<session>.+):train:[0-9]+$")
"""A Tinker model id, ``{session}:train:{n}``: the caller's own when the session is."""


def claim_run_id(session: Session, principal: Principal, requested: str | None) -> str:
    """The id a new run of the caller gets for ``requested`` (module doc). Reads only the caller's
    own sessions, so the answer never depends on another tenant's runs."""
    if not requested:
        return f"{uuid.uuid4()}:train:0"
    check_run_id(requested)
    if requested.startswith(f"{principal.tenant_id}:"):
        return requested
    model = SESSION_MODEL_RE.match(requested)
    if model and session.get(TinkerSession, (principal.tenant_id, model["session"])) is not None:
        return requested
    return check_run_id(f"{principal.tenant_id}:{requested}")


def create_run(
    session: Session,
    principal: Principal,
    *,
    base_model: str,
    now: datetime,
    run_id: str | None = None,
    lora_rank: int | None = None,
    train_mlp: bool = True,
    train_attn: bool = True,
    train_unembed: bool = True,
    user_metadata: dict[str, str] | None = None,
    trainable: bool = True,
    copied_from_run_id: str | None = None,
) -> TrainingRun:
    principal.require_write()
    if not base_model or len(base_model) > 200:
        raise InvalidRequest("base_model must be 1..200 characters")
    if lora_rank is not None and not (1 <= lora_rank <= 4096):
        raise InvalidRequest("lora_rank must be between 1 and 4096")
    check_user_metadata(user_metadata)
    run_id = claim_run_id(session, principal, run_id)
    if session.get(TrainingRun, run_id) is not None:
        # Only the caller's tenant can hold an id in its namespace (rows made before namespaces
        # existed aside), so this reveals nothing about other tenants.
        raise AlreadyExists(f"run id {run_id!r} is already taken")
    run = TrainingRun(
        id=run_id,
        tenant_id=principal.tenant_id,
        base_model=base_model,
        lora_rank=lora_rank,
        train_mlp=train_mlp,
        train_attn=train_attn,
        train_unembed=train_unembed,
        user_metadata=user_metadata,
        trainable=trainable,
        created_at=now,
        last_request_time=now,
        copied_from_run_id=copied_from_run_id,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, principal: Principal, run_id: str) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None or run.tenant_id != principal.tenant_id:
        raise NotFound(f"training run {run_id!r} not found")
    return run


def list_runs(session: Session, principal: Principal, *, limit: int = 20, offset: int = 0) -> tuple[list[TrainingRun], int]:
    base = select(TrainingRun).where(TrainingRun.tenant_id == principal.tenant_id)
    total = session.exec(select(sa.func.count()).select_from(base.subquery())).one()
    rows = session.exec(
        base.order_by(col(TrainingRun.created_at).desc(), col(TrainingRun.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), int(total)


def touch(session: Session, run: TrainingRun, now: datetime) -> None:
    run.last_request_time = now
    session.add(run)
