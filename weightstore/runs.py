"""Training runs: create, fetch (tenant-scoped: another tenant's run is "not found"), list, show, delete.

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

Delete (issue 12, part 5) is a soft delete: every checkpoint of the run goes through the normal
delete path (state ``deleted``, ledger ``end``, blobs touched; the collector reclaims the bytes) and
the run row gets ``deleted_at``, after which every read answers "not found". The row stays because
ledger rows, invoices and the deleted checkpoints still name it, so its id is never reused. The run's
open uploads are aborted with it (their quota reservation ends at once).

The run-row lock (issue 12, part 5): every path that adds a checkpoint to an existing run (an
upload commit, an export's output, a Tinker placement, a restore from the trash) first takes
``lock_for_write``, and ``delete_run`` takes the same lock before it reads anything. So a commit
declared before the delete and landing after it either commits first (and the delete then deletes
it too) or sees ``deleted_at`` under the lock and is refused (``RunDeleted``, permanent): a deleted
run never holds a committed checkpoint. Lock order, everywhere: run, checkpoints, blobs, tenant.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore import audit, checkpoints
from weightstore.auth import Principal
from weightstore.db import for_write
from weightstore.errors import AlreadyExists, InvalidRequest, NotFound, RunDeleted
from weightstore.formats import check_user_metadata
from weightstore.models import (
    Blob,
    Checkpoint,
    CheckpointFile,
    CheckpointState,
    ExportJob,
    ExportJobState,
    TinkerSession,
    TrainingRun,
    Upload,
    UploadState,
)
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


MAX_BASE_MODEL_CHARS = 200
MAX_LORA_RANK = 4096


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
    if not base_model or len(base_model) > MAX_BASE_MODEL_CHARS:
        raise InvalidRequest(f"base_model must be 1..{MAX_BASE_MODEL_CHARS} characters")
    if lora_rank is not None and not (1 <= lora_rank <= MAX_LORA_RANK):
        raise InvalidRequest(f"lora_rank must be between 1 and {MAX_LORA_RANK}")
    check_user_metadata(user_metadata)
    run_id = claim_run_id(session, principal, run_id)
    taken = session.get(TrainingRun, run_id)
    if taken is not None:
        # Only the caller's tenant can hold an id in its namespace (rows made before namespaces
        # existed aside), so this reveals nothing about other tenants.
        deleted = " by a deleted run (run ids are never reused)" if taken.deleted_at is not None else ""
        raise AlreadyExists(f"run id {run_id!r} is already taken{deleted}")
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
    if run is None or run.tenant_id != principal.tenant_id or run.deleted_at is not None:
        raise NotFound(f"training run {run_id!r} not found")
    return run


def list_runs(session: Session, principal: Principal, *, limit: int = 20, offset: int = 0) -> tuple[list[TrainingRun], int]:
    base = select(TrainingRun).where(TrainingRun.tenant_id == principal.tenant_id, col(TrainingRun.deleted_at).is_(None))
    total = session.exec(select(sa.func.count()).select_from(base.subquery())).one()
    rows = session.exec(
        base.order_by(col(TrainingRun.created_at).desc(), col(TrainingRun.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), int(total)


def lock_for_write(session: Session, tenant_id: str, run_id: str) -> TrainingRun:
    """The run ``run_id`` of ``tenant_id``, re-read under its row lock (``db.for_write`` on
    PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises writers), for a caller about to add a
    checkpoint to it (module doc). ``NotFound`` when the tenant holds no such run; ``RunDeleted``
    (permanent) when ``runs rm`` deleted it, including a delete that committed while we waited."""
    q = for_write(select(TrainingRun).where(TrainingRun.id == run_id).execution_options(populate_existing=True))
    run = session.exec(q).first()
    if run is None or run.tenant_id != tenant_id:
        raise NotFound(f"training run {run_id!r} not found")
    refuse_deleted(run)
    return run


def refuse_deleted(run: TrainingRun | None) -> None:
    """``RunDeleted`` (the one message) when ``run`` was deleted by ``runs rm``; the upload protocol
    also says it for an upload that the delete aborted."""
    if run is not None and run.deleted_at is not None:
        raise RunDeleted(
            f"training run {run.id!r} was deleted (runs rm) at {run.deleted_at.isoformat()}: nothing can be "
            "published into it any more; create a new run and save there",
            run_id=run.id,
        )


def touch(session: Session, run: TrainingRun, now: datetime) -> None:
    run.last_request_time = now
    session.add(run)


# --- show and delete (issue 12, part 5) ----------------------------------------------------------
@dataclass(frozen=True)
class KindCount:
    """Visible checkpoints of one kind in a run."""

    kind: str
    count: int
    size_bytes: int
    """Logical bytes (sum of the checkpoints' sizes; shared blobs counted once per checkpoint)."""


@dataclass(frozen=True)
class RunDetail:
    run: TrainingRun
    kinds: list[KindCount]
    """One entry per kind that has visible checkpoints, sorted by kind."""
    checkpoint_count: int
    size_bytes: int
    active_exports: list[str]
    """Ids of export jobs of this run's checkpoints still queued or running (they block delete)."""


def _active_exports(session: Session, run_id: str) -> list[str]:
    """Export jobs whose source is a checkpoint of ``run_id`` and that have not finished."""
    sources = sa.select(col(Checkpoint.id)).where(col(Checkpoint.run_id) == run_id)
    rows = session.exec(
        select(ExportJob.id)
        .where(col(ExportJob.source_checkpoint_id).in_(sources), col(ExportJob.state).not_in(ExportJobState.finished()))
        .order_by(col(ExportJob.created_at), col(ExportJob.id))
    ).all()
    return list(rows)


def run_detail(session: Session, principal: Principal, run_id: str, *, now: datetime) -> RunDetail:
    """The run with its visible checkpoints counted per kind and its unfinished export jobs."""
    run = get_run(session, principal, run_id)
    rows = session.execute(
        sa.select(col(Checkpoint.kind), sa.func.count(), sa.func.coalesce(sa.func.sum(Checkpoint.size_bytes), 0))
        .where(col(Checkpoint.run_id) == run_id, checkpoints.visible_clause(now))
        .group_by(col(Checkpoint.kind))
        .order_by(col(Checkpoint.kind))
    ).all()
    kinds = [KindCount(kind, int(n), int(b)) for kind, n, b in rows]
    return RunDetail(
        run=run,
        kinds=kinds,
        checkpoint_count=sum(k.count for k in kinds),
        size_bytes=sum(k.size_bytes for k in kinds),
        active_exports=_active_exports(session, run_id),
    )


def end_run(session: Session, run: TrainingRun, *, now: datetime) -> int:
    """Delete every checkpoint of ``run`` still holding bytes for its tenant and mark the run deleted;
    returns how many checkpoints were deleted. No permission or export check: ``delete_run`` does them.

    Committed checkpoints take the normal delete path (``checkpoints.end_checkpoint``: ledger ``end``
    at now, or at ``expires_at`` for one whose TTL already passed, so nothing past its TTL is billed);
    expired ones (in the trash, already ended in the ledger) become ``deleted`` too: a deleted run's
    checkpoints are not restorable."""
    q = for_write(
        select(Checkpoint)
        .where(
            Checkpoint.run_id == run.id,
            col(Checkpoint.state).in_([CheckpointState.committed.value, CheckpointState.expired.value]),
        )
        .order_by(col(Checkpoint.id))
    )
    n = 0
    for ckpt in session.exec(q).all():
        if ckpt.state == CheckpointState.committed.value:
            at = now if ckpt.expires_at is None or ckpt.expires_at > now else ckpt.expires_at
            checkpoints.end_checkpoint(session, ckpt, state=CheckpointState.deleted, at=at, now=now)
        else:
            ckpt.state, ckpt.deleted_at = CheckpointState.deleted.value, now
            session.add(ckpt)
            shas = sa.select(col(CheckpointFile.sha256)).where(col(CheckpointFile.checkpoint_id) == ckpt.id)
            session.execute(sa.update(Blob).where(col(Blob.sha256).in_(shas)).values(last_referenced_at=now))
        n += 1
    # Uploads declared into the run can no longer commit (``lock_for_write``): end their quota
    # reservation now rather than at their expiry.
    session.execute(
        sa.update(Upload)
        .where(col(Upload.run_id) == run.id, col(Upload.state) == UploadState.open.value)
        .values(state=UploadState.aborted.value)
    )
    run.deleted_at = now
    session.add(run)
    session.flush()
    return n


def delete_run(session: Session, principal: Principal, run_id: str, *, now: datetime, request_id: str | None = None) -> int:
    """``runs rm``: refuse (``InvalidRequest``, naming the jobs) while export jobs of the run are
    queued or running, else ``end_run``. Returns the number of checkpoints deleted."""
    principal.require_write()
    try:  # the lock first (module doc): whatever is read below is what the delete acts on
        run = lock_for_write(session, principal.tenant_id, run_id)
    except RunDeleted:
        raise NotFound(f"training run {run_id!r} not found") from None  # as every read of a deleted run
    active = _active_exports(session, run_id)
    if active:
        raise InvalidRequest(
            f"run {run_id!r} has {len(active)} export job(s) queued or running ({', '.join(active)}); "
            "wait for them to finish or cancel them (`weightstore exports cancel JOB`), then retry"
        )
    n = end_run(session, run, now=now)
    audit.record(
        session,
        at=now,
        action="run.delete",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=run_id,
        request_id=request_id,
        checkpoints=n,
    )
    return n
