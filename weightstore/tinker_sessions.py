"""Sessions, models and futures of the Tinker download flow (``tinker checkpoint download``).

``create_session`` → ``load_weights`` (create-via-load of a "model") → ``save_weights_external``
(a PEFT export through the export jobs) → ``retrieve_future`` long-polls the job. Every object is an
``idempotency_record`` row (operation ``tinker_session`` / ``tinker_model`` / ``tinker_future``), so
any API replica can answer any poll and no schema change is needed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from weightstore import checkpoints, runs
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import InvalidRequest, NotFound, Unsupported
from weightstore.models import Checkpoint, CheckpointState, IdempotencyRecord, TrainingRun
from weightstore.names import TinkerPath, check_run_id
from weightstore.tinker_compat import _put_record, _record, _share_checkpoint

# --- sessions, models and futures (the download flow) ------------------------------------------
#
# ``tinker checkpoint download tinker://RUN/weights/NAME`` does: create_session → load_weights
# (create-via-load: a new "model" {session}:train:{n} holding the checkpoint) → get_info →
# save_weights_external (here: a PEFT export job) → retrieve_future until done → signed URLs →
# delete → sessions/{id}/finish. Nothing is trained: the model is a non-trainable run.

SESSION_OP, MODEL_OP, FUTURE_OP = "tinker_session", "tinker_model", "tinker_future"


def _session_key(session_id: str) -> str:
    return f"tinker-session:{session_id}"


def _model_key(model_id: str) -> str:
    return f"tinker-model:{model_id}"


def _future_key(request_id: str) -> str:
    return f"tinker-future:{request_id}"


class SessionFinished(InvalidRequest):
    """A heartbeat for a finished session (the router answers 410, which stops the SDK's loop)."""

    code = "session_finished"


def create_session(
    ctx: Context,
    principal: Principal,
    *,
    user_metadata: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    project_id: str | None = None,
) -> str:
    session_id = str(uuid.uuid4())
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        _put_record(
            session,
            principal.tenant_id,
            _session_key(session_id),
            SESSION_OP,
            {"state": "active", "user_metadata": user_metadata, "tags": tags or [], "project_id": project_id},
            now,
        )
    return session_id


def _get_session(session: Session, principal: Principal, session_id: str) -> IdempotencyRecord:
    row = _record(session, principal.tenant_id, _session_key(session_id))
    if row is None or row.operation != SESSION_OP:
        raise NotFound(f"session {session_id!r} not found")
    return row


def heartbeat(ctx: Context, principal: Principal, session_id: str) -> None:
    with session_scope(ctx.engine) as session:
        row = _get_session(session, principal, session_id)
        if (row.response or {}).get("state") != "active":
            raise SessionFinished(f"session {session_id} has finished")


def finish_session(ctx: Context, principal: Principal, session_id: str, reason: str | None) -> None:
    with session_scope(ctx.engine) as session:
        row = _get_session(session, principal, session_id)
        row.response = {**(row.response or {}), "state": "finished", "reason": reason}
        session.add(row)


def _new_future(session: Session, principal: Principal, body: dict[str, Any], now: datetime) -> str:
    request_id = str(uuid.uuid4())
    _put_record(session, principal.tenant_id, _future_key(request_id), FUTURE_OP, body, now)
    return request_id


def load_weights(
    ctx: Context,
    principal: Principal,
    *,
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
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        sess = _get_session(session, principal, session_id)
        if (sess.response or {}).get("state") != "active":
            raise InvalidRequest(f"session {session_id} has finished")
        source = checkpoints.get_for(session, principal, src_path, now=now, allow_public=True)
        model = _record(session, principal.tenant_id, _model_key(model_id))
        if model is None:  # a retry of the same load finds the model already made
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
            _put_record(
                session,
                principal.tenant_id,
                _model_key(model_id),
                MODEL_OP,
                {"source_checkpoint_id": source.id, "source_path": str(src_path), "session_id": session_id},
                now,
            )
        request_id = _new_future(
            session,
            principal,
            {"state": "done", "result": {"path": str(src_path), "model_id": model_id, "type": "load_weights"}},
            now,
        )
    return request_id, model_id


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    base_model: str
    lora_rank: int | None


def get_info(ctx: Context, principal: Principal, model_id: str) -> ModelInfo:
    with session_scope(ctx.engine) as session:
        if _record(session, principal.tenant_id, _model_key(model_id)) is None:
            raise NotFound(f"model {model_id!r} not found (only models made by load_weights exist here)")
        run = runs.get_run(session, principal, model_id)
        return ModelInfo(model_id, run.base_model, run.lora_rank)


def submit_peft_export(
    ctx: Context, principal: Principal, source_checkpoint: Checkpoint, output_name: str, ttl_seconds: int | None
) -> str:
    """Queue a PEFT export of ``source_checkpoint`` through the export jobs. Returns the job id.

    The job writes ``external_weights/{source name}-{output_name}`` next to its source (one name per
    source, so downloads of two checkpoints of one run never collide, and the same download twice
    reuses the same job); ``poll_future`` then shares it into the model's run under ``output_name``.
    """
    from weightstore import exportjobs  # noqa: PLC0415 - exports pull in heavy optional imports

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
    Returns the request id of a future that completes when the export job does."""
    principal.require_write()
    if age_recipients:
        raise Unsupported("age encryption of exports is not supported by weightstore")
    checkpoints.check_ttl(ctx.settings, ttl_seconds)
    TinkerPath.parse(f"tinker://{model_id}/external_weights/{name}")
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        model = _record(session, principal.tenant_id, _model_key(model_id))
        if model is None or not model.response:
            raise NotFound(f"model {model_id!r} not found")
        source = session.get(Checkpoint, model.response["source_checkpoint_id"])
        if source is None or not checkpoints.is_visible(source, now):
            raise NotFound(f"checkpoint {model.response.get('source_path')} not found")
    job_id = submit_peft_export(ctx, principal, source, name, ttl_seconds)
    with session_scope(ctx.engine) as session:
        return _new_future(
            session,
            principal,
            {"state": "export", "job_id": job_id, "model_id": model_id, "name": name, "ttl_seconds": ttl_seconds},
            now,
        )


@dataclass(frozen=True)
class JobStatus:
    """What ``retrieve_future`` needs to know of an export job."""

    done: bool
    failed: bool = False
    error: str | None = None
    result_checkpoint_id: str | None = None


def _job_status(ctx: Context, session: Session, job_id: str) -> JobStatus:
    from weightstore.models import ExportJob  # noqa: PLC0415

    job = session.get(ExportJob, job_id)
    if job is None:
        return JobStatus(done=True, failed=True, error=f"export job {job_id} vanished")
    if job.state in {"failed", "cancelled", "canceled"}:
        msg = (job.error or {}).get("message") if isinstance(job.error, dict) else None
        return JobStatus(done=True, failed=True, error=msg or f"export job {job_id} {job.state}")
    if job.result_checkpoint_id and job.state in {"done", "succeeded", "completed", "complete"}:
        return JobStatus(done=True, result_checkpoint_id=job.result_checkpoint_id)
    return JobStatus(done=False)


def poll_future(ctx: Context, principal: Principal, request_id: str) -> dict[str, Any] | None:
    """The future's final JSON (a result, or ``{"error", "category"}``), or None while it runs."""
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        row = _record(session, principal.tenant_id, _future_key(request_id))
        if row is None or row.operation != FUTURE_OP or not row.response:
            raise NotFound(f"request {request_id!r} not found")
        state = row.response
        if state["state"] == "done":
            return dict(state["result"])
        status = _job_status(ctx, session, state["job_id"])
        if not status.done:
            return None
        if status.failed:
            result: dict[str, Any] = {"error": status.error, "category": "user"}
        else:
            result = _place_export(ctx, session, principal, state, status.result_checkpoint_id, now)
        row.response = {"state": "done", "result": result}
        session.add(row)
        return result


def _place_export(
    ctx: Context, session: Session, principal: Principal, state: dict[str, Any], result_checkpoint_id: str | None, now: datetime
) -> dict[str, Any]:
    """Make the finished export appear at ``tinker://{model}/external_weights/{name}`` (zero-copy
    when the job wrote it elsewhere, e.g. next to its source)."""
    exported = session.get(Checkpoint, result_checkpoint_id) if result_checkpoint_id else None
    if exported is None or not checkpoints.is_visible(exported, now):
        return {"error": "export result is gone", "category": "server"}
    model_id, name = state["model_id"], state["name"]
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
        placed = _share_checkpoint(
            session,
            principal,
            exported,
            run,
            name=name,
            kind="external",
            ttl_seconds=state.get("ttl_seconds"),
            now=now,
            request_id=None,
        )
        placed.copied_from_id, placed.exported_from_id = None, exported.exported_from_id
        session.add(placed)
    return {"path": checkpoints.tinker_path(placed), "size_bytes": placed.size_bytes, "type": "save_weights_external"}
