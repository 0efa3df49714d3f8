"""Sessions, models and futures of the Tinker download flow (``tinker checkpoint download``).

The SDK does: ``create_session`` → ``load_weights`` (create-via-load: a new "model"
``{session}:train:{n}``, a non-trainable run that stands for the checkpoint) → ``get_info`` →
``save_weights_external`` (here: a PEFT export job) → ``retrieve_future`` until done → signed URLs
→ delete → ``sessions/{id}/finish``. Nothing is trained.

Each object is a row of its own table (``tinker_session``, ``tinker_model``, ``tinker_future``),
keyed by (tenant, id) so a foreign id is simply not found, and any API replica can answer any poll.
Catalog functions take ``session`` first and never commit; ``save_weights_external`` and
``wait_for_future`` are workflows.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from weightstore import checkpoints, exportjobs, retention, runs
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import InvalidRequest, NotFound, RunDeleted, SessionFinished, TenantQuotaExceeded, Unsupported
from weightstore.formats import check_user_metadata
from weightstore.models import (
    Checkpoint,
    CheckpointState,
    ExportJob,
    ExportJobState,
    TinkerFuture,
    TinkerFutureState,
    TinkerModel,
    TinkerSession,
    TinkerSessionState,
    TrainingRun,
)
from weightstore.names import TinkerPath, check_run_id
from weightstore.tinker.checkpoints import share_checkpoint

# --- sessions -----------------------------------------------------------------------------------


def create_session(
    session: Session,
    principal: Principal,
    *,
    now: datetime,
    user_metadata: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    project_id: str | None = None,
) -> str:
    """A new active session; returns its id."""
    check_user_metadata(user_metadata, strings_only=False)
    session_id = str(uuid.uuid4())
    session.add(
        TinkerSession(
            tenant_id=principal.tenant_id,
            id=session_id,
            created_at=now,
            user_metadata=user_metadata,
            tags=tags or [],
            project_id=project_id,
        )
    )
    session.flush()
    return session_id


def get_session(session: Session, principal: Principal, session_id: str) -> TinkerSession:
    row = session.get(TinkerSession, (principal.tenant_id, session_id))
    if row is None:
        raise NotFound(f"session {session_id!r} not found")
    return row


def heartbeat(session: Session, principal: Principal, session_id: str) -> None:
    """``SessionFinished`` once the session is finished: that answer is what stops the SDK's loop."""
    if get_session(session, principal, session_id).state != TinkerSessionState.active:
        raise SessionFinished(f"session {session_id} has finished")


def finish_session(session: Session, principal: Principal, session_id: str, reason: str | None, *, now: datetime) -> None:
    """Finish the session and delete the runs its ``load_weights`` made that hold nothing any more
    (``tinker checkpoint download`` deletes its export before finishing), so no empty run is left
    behind (issue 12, part 5). A model run that still holds a visible checkpoint, or whose export
    job has not finished, is kept."""
    row = get_session(session, principal, session_id)
    row.state, row.finish_reason = TinkerSessionState.finished, reason
    session.add(row)
    _drop_empty_model_runs(session, principal, session_id, now=now)


def _drop_empty_model_runs(session: Session, principal: Principal, session_id: str, *, now: datetime) -> None:
    model_ids = session.exec(
        select(TinkerModel.id).where(TinkerModel.tenant_id == principal.tenant_id, TinkerModel.session_id == session_id)
    ).all()
    for model_id in model_ids:
        run = session.get(TrainingRun, model_id)
        if run is None or run.deleted_at is not None or run.trainable:
            continue
        detail = runs.run_detail(session, principal, model_id, now=now)
        if detail.checkpoint_count == 0 and not detail.active_exports:
            runs.end_run(session, run, now=now)


# --- models -------------------------------------------------------------------------------------


def _done_future(session: Session, principal: Principal, result: dict[str, Any], now: datetime) -> str:
    request_id = str(uuid.uuid4())
    session.add(
        TinkerFuture(tenant_id=principal.tenant_id, id=request_id, state=TinkerFutureState.done, created_at=now, result=result)
    )
    return request_id


def _make_model(
    session: Session,
    principal: Principal,
    *,
    model_id: str,
    session_id: str,
    source: Checkpoint,
    source_path: TinkerPath,
    base_model: str | None,
    user_metadata: dict[str, str] | None,
    now: datetime,
) -> None:
    """The model's non-trainable run (same base model and LoRA shape as the source's) and its row."""
    src_run = session.get(TrainingRun, source.run_id)
    assert src_run is not None
    runs.create_run(
        session,
        principal,
        base_model=base_model or src_run.base_model,
        now=now,
        run_id=model_id,
        lora_rank=src_run.lora_rank,
        train_mlp=src_run.train_mlp,
        train_attn=src_run.train_attn,
        train_unembed=src_run.train_unembed,
        user_metadata=user_metadata,
        trainable=False,
        copied_from_run_id=src_run.id,
    )
    session.add(
        TinkerModel(
            tenant_id=principal.tenant_id,
            id=model_id,
            session_id=session_id,
            source_checkpoint_id=source.id,
            source_path=str(source_path),
            created_at=now,
        )
    )


def load_weights(
    session: Session,
    principal: Principal,
    *,
    now: datetime,
    session_id: str,
    model_seq_id: int,
    path: str,
    base_model: str | None = None,
    user_metadata: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Create-via-load: a new non-trainable run ``{session}:train:{n}`` that holds ``path``.
    Returns (request_id, model_id); the future is complete at once."""
    principal.require_write()
    src_path = TinkerPath.parse(path)
    if src_path.kind != "training":
        raise InvalidRequest(f"only weights/ checkpoints can be loaded, not {src_path.checkpoint_id}")
    model_id = check_run_id(f"{session_id}:train:{model_seq_id}")
    if get_session(session, principal, session_id).state != TinkerSessionState.active:
        raise InvalidRequest(f"session {session_id} has finished")
    source = checkpoints.get_for(session, principal, src_path, now=now, allow_public=True)
    if checkpoints.layouts(session, [source])[source.id] == "dcp":
        raise InvalidRequest(
            f"{src_path} is a PyTorch Distributed Checkpoint (layout dcp), not Tinker full state "
            "(adapter_model.safetensors, adapter_config.json, optimizer.safetensors): load it with "
            "dcp.load(..., storage_reader=weightstore.integrations.dcp.WeightstoreStorageReader(...))"
        )
    if session.get(TinkerModel, (principal.tenant_id, model_id)) is None:  # a retried load finds it made
        _make_model(
            session,
            principal,
            model_id=model_id,
            session_id=session_id,
            source=source,
            source_path=src_path,
            base_model=base_model,
            user_metadata=user_metadata,
            now=now,
        )
    result = {"path": str(src_path), "model_id": model_id, "type": "load_weights"}
    request_id = _done_future(session, principal, result, now)
    session.flush()
    return request_id, model_id


def get_model(session: Session, principal: Principal, model_id: str) -> TinkerModel:
    model = session.get(TinkerModel, (principal.tenant_id, model_id))
    if model is None:
        raise NotFound(f"model {model_id!r} not found (only models made by load_weights exist here)")
    return model


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    base_model: str
    lora_rank: int | None


def get_info(session: Session, principal: Principal, model_id: str) -> ModelInfo:
    get_model(session, principal, model_id)
    run = runs.get_run(session, principal, model_id)
    return ModelInfo(model_id, run.base_model, run.lora_rank)


def model_source(session: Session, principal: Principal, model_id: str, *, now: datetime) -> Checkpoint:
    """The checkpoint a model was loaded from, while it is still visible."""
    model = get_model(session, principal, model_id)
    source = session.get(Checkpoint, model.source_checkpoint_id)
    if source is None or not checkpoints.is_visible(source, now):
        raise NotFound(f"checkpoint {model.source_path} not found")
    return source


# --- futures ------------------------------------------------------------------------------------


def submit_peft_export(
    ctx: Context, principal: Principal, source_checkpoint: Checkpoint, output_name: str, ttl_seconds: int | None
) -> str:
    """Queue a PEFT export of ``source_checkpoint`` through the export jobs. Returns the job id.

    The job writes ``external_weights/{source name}-{output_name}`` next to its source (one name per
    source, so downloads of two checkpoints of one run never collide, and the same download twice
    reuses the same job); ``poll_future`` then shares it into the model's run under ``output_name``.
    Workflow (the export job submission opens its own transaction).
    """
    job_name = f"{source_checkpoint.name}-{output_name}"[: ctx.settings.name_max_length]
    return str(exportjobs.submit_peft_export(ctx, principal, checkpoints.tinker_path(source_checkpoint), job_name, ttl_seconds))


def save_weights_external(
    ctx: Context,
    principal: Principal,
    *,
    model_id: str,
    name: str,
    ttl_seconds: int | None,
    age_recipients: list[str] | None = None,
) -> str:
    """Export the model's checkpoint as PEFT files (``external_weights/{name}`` of the model's run).
    Returns the request id of a future that completes when the export job does. Workflow: one
    transaction to find the source, the job submission, one to record the future."""
    principal.require_write()
    if age_recipients:
        raise Unsupported("age encryption of exports is not supported by weightstore")
    retention.check_ttl(ctx.settings, ttl_seconds)
    TinkerPath.parse(f"tinker://{model_id}/external_weights/{name}")
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        source = model_source(session, principal, model_id, now=now)
    job_id = submit_peft_export(ctx, principal, source, name, ttl_seconds)
    request_id = str(uuid.uuid4())
    with session_scope(ctx.engine) as session:
        session.add(
            TinkerFuture(
                tenant_id=principal.tenant_id,
                id=request_id,
                state=TinkerFutureState.export,
                created_at=now,
                job_id=job_id,
                model_id=model_id,
                output_name=name,
                ttl_seconds=ttl_seconds,
            )
        )
    return request_id


@dataclass(frozen=True)
class JobStatus:
    """What ``poll_future`` needs to know of an export job."""

    done: bool
    failed: bool = False
    error: str | None = None
    result_checkpoint_id: str | None = None


def _job_status(session: Session, job_id: str | None) -> JobStatus:
    job = session.get(ExportJob, job_id) if job_id else None
    if job is None:
        return JobStatus(done=True, failed=True, error=f"export job {job_id} vanished")
    if job.state in {ExportJobState.failed, ExportJobState.cancelled}:
        msg = (job.error or {}).get("message") if isinstance(job.error, dict) else None
        return JobStatus(done=True, failed=True, error=msg or f"export job {job_id} {job.state}")
    if job.state == ExportJobState.succeeded and job.result_checkpoint_id:
        return JobStatus(done=True, result_checkpoint_id=job.result_checkpoint_id)
    return JobStatus(done=False)


def poll_future(session: Session, principal: Principal, request_id: str, *, now: datetime) -> dict[str, Any] | None:
    """The future's final JSON (a result, or ``{"error", "category"}``), or None while its export
    job runs. The first poll that sees the job finished places its output and records the result."""
    future = session.get(TinkerFuture, (principal.tenant_id, request_id))
    if future is None:
        raise NotFound(f"request {request_id!r} not found")
    if future.state == TinkerFutureState.done:
        return dict(future.result or {})
    status = _job_status(session, future.job_id)
    if not status.done:
        return None
    if status.failed:
        result: dict[str, Any] = {"error": status.error, "category": "user"}
    else:
        try:  # placing is a zero-copy checkpoint: held to the quota and the run's lock (issue 12, parts 2, 5)
            with session.begin_nested():
                result = _place_export(session, principal, future, status.result_checkpoint_id, now)
        except (TenantQuotaExceeded, RunDeleted) as exc:  # permanent: the future ends with it, once
            result = {"error": exc.message, "category": "user"}
    future.state, future.result = TinkerFutureState.done, result
    session.add(future)
    return result


def wait_for_future(
    ctx: Context, principal: Principal, request_id: str, *, timeout_seconds: float, interval_seconds: float
) -> dict[str, Any] | None:
    """``poll_future`` until it has a result or ``timeout_seconds`` pass (then None). Workflow: one
    short transaction per poll, none held while sleeping (on SQLite a transaction is a write lock)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        with session_scope(ctx.engine) as session:
            result = poll_future(session, principal, request_id, now=ctx.clock.now())
        remaining = deadline - time.monotonic()
        if result is not None or remaining <= 0:
            return result
        time.sleep(min(interval_seconds, remaining))  # the last poll is at the deadline, not past it


def _place_export(
    session: Session, principal: Principal, future: TinkerFuture, result_checkpoint_id: str | None, now: datetime
) -> dict[str, Any]:
    """Make the finished export appear at ``tinker://{model}/external_weights/{name}`` (zero-copy
    when the job wrote it elsewhere, e.g. next to its source)."""
    exported = session.get(Checkpoint, result_checkpoint_id) if result_checkpoint_id else None
    if exported is None or not checkpoints.is_visible(exported, now):
        return {"error": "export result is gone", "category": "server"}
    model_id, name = future.model_id, future.output_name
    assert model_id is not None and name is not None
    if exported.run_id == model_id and exported.kind == "external" and exported.name == name:
        placed = exported
    else:
        existing = session.exec(
            select(Checkpoint).where(
                Checkpoint.run_id == model_id,
                Checkpoint.kind == "external",
                Checkpoint.name == name,
                checkpoints.visible_clause(now),
            )
        ).first()
        if existing is not None:
            checkpoints.end_checkpoint(session, existing, state=CheckpointState.deleted, at=now, now=now)
            session.flush()
        run = session.get(TrainingRun, model_id)
        assert run is not None
        placed = share_checkpoint(
            session,
            principal,
            exported,
            run,
            name=name,
            kind="external",
            ttl_seconds=future.ttl_seconds,
            now=now,
            request_id=None,
        )
        placed.copied_from_id, placed.exported_from_id = None, exported.exported_from_id
        session.add(placed)
    return {"path": checkpoints.tinker_path(placed), "size_bytes": placed.size_bytes, "type": "save_weights_external"}
