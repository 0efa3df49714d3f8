"""Tinker-compatible REST surface, storage half (``/api/v1``): runs, checkpoints and their actions.

Client config, training runs, checkpoints, publish, TTL, weights info, copy, external-weights URLs,
the legacy archive, audit.

The ``tinker`` SDK (0.38.0) and its CLI call these paths unchanged. Run ids contain ``:`` (sent
unencoded) and a checkpoint id is two path segments (``weights/step-1``), so every checkpoint
route is spelled out as ``.../checkpoints/{segment}/{name}[/action]`` — explicit paths, no
catch-alls, so nothing here can shadow another router's ``/api/v1/...`` routes (billing).
Errors propagate to the one table in ``errors.py``: no permanent error is ever 408/409/429/5xx
(the SDK retries those for minutes), the only 409 being Tinker's own publish/unpublish contract.
Request and response schemas live in ``tinker_schemas``.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal, cast

from fastapi import APIRouter, Header, Query, Request, Response
from sqlmodel import Session, select

from weightstore import checkpoints
from weightstore.auth import Principal
from weightstore.billing.units import day_start
from weightstore.errors import NotFound
from weightstore.models import BaseModel as BaseModelRow
from weightstore.models import Checkpoint, TrainingRun
from weightstore.names import TinkerPath
from weightstore.tinker import archive
from weightstore.tinker import audit_log as tinker_audit_log
from weightstore.tinker import checkpoints as tinker_checkpoints
from weightstore.tinker import runs as tinker_runs

from ..deps import AdminPrincipal, CtxDep, CurrentPrincipal, Offset, SessionDep, WriterPrincipal
from ..errors import request_id_of
from .tinker_schemas import (
    ArchiveUrlPublic,
    AuditEntryPublic,
    AuditLogPublic,
    CheckpointType,
    CopyWeightsBody,
    CopyWeightsPublic,
    CursorPublic,
    ExternalWeightsUrlsPublic,
    ServerCapabilitiesPublic,
    SupportedModelPublic,
    TinkerCheckpointPublic,
    TinkerCheckpointsPublic,
    TinkerPathBody,
    TinkerRunPublic,
    TinkerRunsPublic,
    TTLBody,
    WeightsInfoPublic,
)

router = APIRouter(prefix="/api/v1", tags=["tinker"])

AccessScope = Annotated[Literal["owned", "accessible"], Query()]
CKPT = "/training_runs/{run_id}/checkpoints/{segment}/{name}"


def tinker_checkpoint(ckpt: Checkpoint) -> TinkerCheckpointPublic:
    path = TinkerPath(ckpt.run_id, ckpt.kind, ckpt.name)
    return TinkerCheckpointPublic(
        checkpoint_id=path.checkpoint_id,
        # A cast, not a check: the row's kind is a plain str, and pydantic validates it against the
        # literal when the model is built (the list views pass only TINKER_KINDS).
        checkpoint_type=cast(CheckpointType, ckpt.kind),
        time=ckpt.created_at,
        tinker_path=str(path),
        size_bytes=ckpt.size_bytes,
        public=ckpt.public,
        user_metadata=ckpt.user_metadata,
        expires_at=ckpt.expires_at,
    )


def tinker_run(session: Session, principal: Principal, run: TrainingRun, now: datetime) -> TinkerRunPublic:
    last = tinker_checkpoints.last_checkpoint(session, principal, run, "training", now=now)
    last_sampler = tinker_checkpoints.last_checkpoint(session, principal, run, "sampler", now=now)
    return TinkerRunPublic(
        training_run_id=run.id,
        base_model=run.base_model,
        model_owner=run.tenant_id,
        is_lora=True,
        lora_rank=run.lora_rank,
        last_request_time=run.last_request_time,
        last_checkpoint=tinker_checkpoint(last) if last else None,
        last_sampler_checkpoint=tinker_checkpoint(last_sampler) if last_sampler else None,
        user_metadata=run.user_metadata if run.tenant_id == principal.tenant_id else None,
    )


def _path(run_id: str, segment: str, name: str) -> TinkerPath:
    """The checkpoint a Tinker route names. A kind Tinker does not know (a merged export, a Hub
    ``files`` folder) is answered as missing on this surface, never built into a Tinker answer."""
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    if path.kind not in tinker_checkpoints.TINKER_KINDS:
        raise NotFound(f"checkpoint {path} not found")
    return path


# --- bootstrap ----------------------------------------------------------------------------------
@router.post("/client/config", operation_id="tinker_client_config")
def client_config(principal: CurrentPrincipal) -> dict[str, object]:
    """Feature flags for the SDK. JWT exchange off: the raw ``tml-`` key is the credential. Answering
    (and authenticating) here makes a bad key fail fast at client construction."""
    return {"pjwt_auth_enabled": False, "credential_default_source": "api_key"}


@router.post("/client/dynamic_config", operation_id="tinker_client_dynamic_config")
def client_dynamic_config(principal: CurrentPrincipal) -> dict[str, object]:
    return {}


@router.post("/telemetry", operation_id="tinker_telemetry")
def telemetry() -> dict[str, str]:
    """Accepted and dropped: weightstore keeps no client telemetry."""
    return {"status": "accepted"}


@router.get("/healthz", operation_id="tinker_healthz")
def tinker_healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities", operation_id="tinker_server_capabilities", response_model=ServerCapabilitiesPublic)
def server_capabilities(principal: CurrentPrincipal, session: SessionDep) -> ServerCapabilitiesPublic:
    """Registered base models; none is trainable or sampleable here (storage only)."""
    names = session.exec(select(BaseModelRow.name).order_by(BaseModelRow.name)).all()
    return ServerCapabilitiesPublic(
        supported_models=[SupportedModelPublic(model_name=n, trainable=False, sampleable=False) for n in names]
    )


# --- training runs ------------------------------------------------------------------------------
@router.get("/training_runs", operation_id="tinker_list_training_runs", response_model=TinkerRunsPublic)
def list_training_runs(
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Offset = 0,
    access_scope: AccessScope = "owned",
    project_id: str | None = None,
) -> TinkerRunsPublic:
    """Newest first. ``project_id`` is accepted and ignored: weightstore has tenants, not projects."""
    now = ctx.clock.now()
    rows, total = tinker_runs.list_runs(session, principal, now=now, limit=limit, offset=offset, access_scope=access_scope)
    return TinkerRunsPublic(
        training_runs=[tinker_run(session, principal, r, now) for r in rows],
        cursor=CursorPublic(offset=offset, limit=limit, total_count=total),
    )


@router.get("/training_runs/{run_id}", operation_id="tinker_get_training_run", response_model=TinkerRunPublic)
def get_training_run(
    run_id: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep, access_scope: AccessScope = "owned"
) -> TinkerRunPublic:
    now = ctx.clock.now()
    return tinker_run(
        session, principal, tinker_runs.get_run(session, principal, run_id, now=now, access_scope=access_scope), now
    )


@router.get(
    "/training_runs/{run_id}/checkpoints", operation_id="tinker_list_run_checkpoints", response_model=TinkerCheckpointsPublic
)
def list_run_checkpoints(run_id: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> TinkerCheckpointsPublic:
    """Every visible checkpoint of the run, newest first, unpaged (``cursor: null``). Other tenants
    see a run only through its published checkpoints."""
    now = ctx.clock.now()
    run = tinker_runs.get_run(session, principal, run_id, now=now, access_scope="accessible")
    rows = tinker_checkpoints.run_checkpoints(session, principal, run, now=now)
    return TinkerCheckpointsPublic(checkpoints=[tinker_checkpoint(c) for c in rows], cursor=None)


@router.get("/checkpoints", operation_id="tinker_list_user_checkpoints", response_model=TinkerCheckpointsPublic)
def list_user_checkpoints(
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> TinkerCheckpointsPublic:
    rows, total = tinker_checkpoints.user_checkpoints(session, principal, now=ctx.clock.now(), limit=limit, offset=offset)
    return TinkerCheckpointsPublic(
        checkpoints=[tinker_checkpoint(c) for c in rows], cursor=CursorPublic(offset=offset, limit=limit, total_count=total)
    )


# --- one checkpoint -----------------------------------------------------------------------------
@router.delete(CKPT, operation_id="tinker_delete_checkpoint", status_code=204)
def delete_checkpoint(
    run_id: str, segment: str, name: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> Response:
    checkpoints.delete(session, principal, _path(run_id, segment, name), now=ctx.clock.now(), request_id=request_id_of(request))
    return Response(status_code=204)


def _set_public(
    session: Session, principal: Principal, path: TinkerPath, public: bool, now: datetime, request: Request
) -> Response:
    """Already in that state: ``Conflict``, which the error table answers 409 (Tinker's contract)."""
    tinker_checkpoints.set_public(session, principal, path, public, now=now, request_id=request_id_of(request))
    return Response(status_code=204)


@router.post(
    CKPT + "/publish",
    operation_id="tinker_publish_checkpoint",
    status_code=204,
    responses={409: {"description": "Already public (Tinker's contract)"}},
)
def publish_checkpoint(
    run_id: str, segment: str, name: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> Response:
    return _set_public(session, principal, _path(run_id, segment, name), True, ctx.clock.now(), request)


@router.delete(
    CKPT + "/publish",
    operation_id="tinker_unpublish_checkpoint",
    status_code=204,
    responses={409: {"description": "Already private (Tinker's contract)"}},
)
def unpublish_checkpoint(
    run_id: str, segment: str, name: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> Response:
    return _set_public(session, principal, _path(run_id, segment, name), False, ctx.clock.now(), request)


@router.put(CKPT + "/ttl", operation_id="tinker_set_checkpoint_ttl", response_model=TinkerCheckpointPublic)
def set_checkpoint_ttl(
    run_id: str,
    segment: str,
    name: str,
    body: TTLBody,
    principal: WriterPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    request: Request,
) -> TinkerCheckpointPublic:
    ckpt = checkpoints.set_ttl(
        session,
        principal,
        _path(run_id, segment, name),
        body.ttl_seconds,
        settings=ctx.settings,
        now=ctx.clock.now(),
        request_id=request_id_of(request),
    )
    return tinker_checkpoint(ckpt)


@router.get(
    CKPT + "/external_weights_urls", operation_id="tinker_external_weights_urls", response_model=ExternalWeightsUrlsPublic
)
def external_weights_urls(
    run_id: str, segment: str, name: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep
) -> ExternalWeightsUrlsPublic:
    """Presigned GETs (no credentials needed) for every file of the checkpoint, keyed by its path."""
    now = ctx.clock.now()
    ckpt = checkpoints.get_for(session, principal, _path(run_id, segment, name), now=now, allow_public=True)
    urls = checkpoints.download_urls(session, ckpt, store=ctx.store, settings=ctx.settings, now=now)
    expires = min((u.expires_at for u in urls), default=now)
    return ExternalWeightsUrlsPublic(urls={u.path: u.url for u in urls}, expires=expires)


@router.get(CKPT + "/archive", operation_id="tinker_checkpoint_archive", response_model=ArchiveUrlPublic)
def checkpoint_archive(run_id: str, segment: str, name: str, principal: CurrentPrincipal, ctx: CtxDep) -> ArchiveUrlPublic:
    """Legacy (SDK ≤ 0.35): an uncompressed tar of ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``checkpoint_complete``, built here, as ``{url, expires}``."""
    res = archive.archive_url(ctx, principal, _path(run_id, segment, name))
    return ArchiveUrlPublic(url=res.url, expires=res.expires_at)


# --- by tinker path -----------------------------------------------------------------------------
@router.post("/weights_info", operation_id="tinker_weights_info", response_model=WeightsInfoPublic)
def weights_info(body: TinkerPathBody, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> WeightsInfoPublic:
    info = tinker_checkpoints.weights_info(
        session, principal, TinkerPath.parse(body.tinker_path), store=ctx.store, settings=ctx.settings, now=ctx.clock.now()
    )
    return WeightsInfoPublic(
        base_model=info.base_model,
        is_lora=info.is_lora,
        lora_rank=info.lora_rank,
        train_unembed=info.train_unembed,
        train_mlp=info.train_mlp,
        train_attn=info.train_attn,
    )


@router.post("/copy_weights", operation_id="tinker_copy_weights", response_model=CopyWeightsPublic)
def copy_weights(
    body: CopyWeightsBody,
    principal: WriterPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    request: Request,
    x_idempotency_key: Annotated[str | None, Header()] = None,
) -> CopyWeightsPublic:
    """Zero-copy into a new non-trainable run; the same ``X-Idempotency-Key`` answers the same copy.
    Weights access tokens are not a weightstore concept: another tenant's checkpoint can be copied
    only when it is published."""
    run_id = None
    if body.session_id is not None and body.model_seq_id is not None:
        run_id = f"{body.session_id}:train:{body.model_seq_id}"
    path = tinker_checkpoints.copy_weights(
        session,
        principal,
        body.source_path,
        settings=ctx.settings,
        now=ctx.clock.now(),
        ttl_seconds=body.ttl_seconds,
        run_id=run_id,
        idempotency_key=x_idempotency_key,
        request_id=request_id_of(request),
    )
    return CopyWeightsPublic(tinker_path=path)


# --- admin --------------------------------------------------------------------------------------
@router.get("/audit", operation_id="tinker_audit_log", response_model=AuditLogPublic)
def audit_log(
    principal: AdminPrincipal,
    session: SessionDep,
    event_type: Literal["all", "checkpoints", "projects", "teams", "organizations"] = "all",
    day: date | None = None,
) -> AuditLogPublic:
    start = day_start(day) if day else None
    rows = tinker_audit_log.audit_entries(session, event_type=event_type, day=start)
    entries = []
    for r in rows:
        details = {**(r.details or {}), "tenant_id": r.tenant_id, "key_id": r.key_id, "request_id": r.request_id}
        target = r.target or ""
        entries.append(
            AuditEntryPublic(
                timestamp=r.at,
                event=r.action.replace(".", "_"),
                event_details=details,
                tinker_path=target if target.startswith("tinker://") else None,
                model_id=target[9:].split("/", 1)[0] if target.startswith("tinker://") else None,
            )
        )
    return AuditLogPublic(entries=entries)


__all__ = ["router", "tinker_checkpoint", "tinker_run"]
