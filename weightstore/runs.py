"""Training runs: create, fetch (tenant-scoped: another tenant's run is "not found"), list."""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.auth import Principal
from weightstore.errors import AlreadyExists, InvalidRequest, NotFound
from weightstore.models import TrainingRun
from weightstore.names import check_run_id


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
    # Tinker-shaped default id: "{session}:train:0".
    run_id = check_run_id(run_id) if run_id else f"{uuid.uuid4()}:train:0"
    if session.get(TrainingRun, run_id) is not None:
        # Same answer whoever owns it: an id is global, and "taken" reveals nothing about content.
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
