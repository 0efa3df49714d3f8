"""Training runs as Tinker lists them, by ``access_scope``.

``owned`` = the caller's tenant; ``accessible`` = owned plus other tenants' runs that have at least
one *published* checkpoint. Catalog functions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.auth import Principal
from weightstore.errors import InvalidRequest, NotFound
from weightstore.models import Checkpoint, TrainingRun
from weightstore.tinker.checkpoints import published_run_ids

AccessScope = Literal["owned", "accessible"]


def check_access_scope(access_scope: str) -> None:
    if access_scope not in {"owned", "accessible"}:
        raise InvalidRequest("access_scope must be 'owned' or 'accessible'")


def get_run(session: Session, principal: Principal, run_id: str, *, now: datetime, access_scope: str = "owned") -> TrainingRun:
    """A run the caller owns, or (``accessible``) one with a published checkpoint."""
    check_access_scope(access_scope)
    run = session.get(TrainingRun, run_id)
    if run is not None and run.deleted_at is not None:  # `runs rm` (issue 12, part 5)
        run = None
    if run is not None and run.tenant_id == principal.tenant_id:
        return run
    if (
        run is not None
        and access_scope == "accessible"
        and session.exec(published_run_ids(now).where(Checkpoint.run_id == run_id)).first() is not None
    ):
        return run
    raise NotFound(f"training run {run_id!r} not found")


def list_runs(
    session: Session, principal: Principal, *, now: datetime, limit: int, offset: int, access_scope: str = "owned"
) -> tuple[list[TrainingRun], int]:
    """Newest first. Returns (page, total)."""
    check_access_scope(access_scope)
    q = select(TrainingRun).where(col(TrainingRun.deleted_at).is_(None))
    if access_scope == "owned":
        q = q.where(TrainingRun.tenant_id == principal.tenant_id)
    else:
        q = q.where(
            sa.or_(
                col(TrainingRun.tenant_id) == principal.tenant_id,
                col(TrainingRun.id).in_(published_run_ids(now)),
            )
        )
    total = session.exec(select(sa.func.count()).select_from(q.subquery())).one()
    rows = session.exec(
        q.order_by(col(TrainingRun.created_at).desc(), col(TrainingRun.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), int(total)
