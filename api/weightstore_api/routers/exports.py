"""Export jobs and base models: ``/v1/exports...`` (trainers) and ``/v1/base-models...`` (admin writes)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from weightstore import basemodels, exportjobs, hub
from weightstore.auth import Principal
from weightstore.models import BaseModel as BaseModelRow
from weightstore.models import ExportJob
from weightstore.names import TinkerPath, check_sha256

from ..deps import AdminPrincipal, CtxDep, CurrentPrincipal, Offset, SessionDep, WriterPrincipal
from ..errors import request_id_of
from ..schemas import (
    BaseModelCreate,
    BaseModelFileDecl,
    BaseModelPublic,
    BaseModelsPublic,
    BlobReceipt,
    ExportBatchCreate,
    ExportBatchPublic,
    ExportCreate,
    ExportJobPublic,
    ExportJobsPublic,
    ExportOptions,
    HubCoordinatesPublic,
)

router = APIRouter(prefix="/v1", tags=["exports"])
STREAM_BATCH = 8 * 1024 * 1024


def job_public(session: Session, job: ExportJob) -> ExportJobPublic:
    src = exportjobs.source_path(session, job)
    out = None
    coords = None
    if src and job.output_name:
        output = TinkerPath(TinkerPath.parse(src).run_id, exportjobs.TARGETS[job.target], job.output_name)
        out = str(output)
        rev = hub.checkpoint_revision(output.kind, output.name)
        coords = HubCoordinatesPublic(repo_id=hub.run_repo_id(output.run_id, job.tenant_id), revision=rev, subfolder=rev)
    return ExportJobPublic(
        job_id=job.id,
        batch_id=job.batch_id,
        state=job.state,
        source=src,
        target=job.target,
        base_model=job.base_model,
        output_path=out,
        result=exportjobs.result_path(session, job),
        progress_bytes=job.progress_bytes,
        total_bytes=job.total_bytes,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        not_before=job.not_before,
        verification=job.verification,
        error=job.error,
        hub=coords,
    )


def _opts(options: ExportOptions | None) -> dict[str, Any] | None:
    return options.model_dump(exclude_none=True) if options else None


# --- exports ----------------------------------------------------------------------------------
@router.post("/exports", operation_id="create_export", status_code=202, response_model=ExportJobPublic)
def create_export(body: ExportCreate, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep) -> ExportJobPublic:
    """Queue an export. The same request twice returns the same job (a failed or cancelled one is
    queued again)."""
    job = exportjobs.submit(
        ctx,
        principal,
        body.source,
        target=body.target,
        base_model=body.base_model,
        output_name=body.output_name,
        options=_opts(body.options),
    )
    return job_public(session, job)


@router.post("/exports/batch", operation_id="create_export_batch", status_code=202, response_model=ExportBatchPublic)
def create_export_batch(
    body: ExportBatchCreate, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep
) -> ExportBatchPublic:
    batch_id, jobs = exportjobs.submit_batch(
        ctx,
        principal,
        target=body.target,
        sources=body.sources,
        run_id=body.run_id,
        kind=body.kind,
        name_pattern=body.name_pattern,
        base_model=body.base_model,
        options=_opts(body.options),
    )
    return ExportBatchPublic(batch_id=batch_id, jobs=[job_public(session, j) for j in jobs])


@router.get("/exports", operation_id="list_exports", response_model=ExportJobsPublic)
def list_exports(
    principal: CurrentPrincipal,
    session: SessionDep,
    state: str | None = None,
    batch_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> ExportJobsPublic:
    rows, total = exportjobs.list_jobs(session, principal, state=state, batch_id=batch_id, limit=limit, offset=offset)
    return ExportJobsPublic(jobs=[job_public(session, j) for j in rows], total_count=total)


@router.get("/exports/{job_id}", operation_id="get_export", response_model=ExportJobPublic)
def get_export(job_id: str, principal: CurrentPrincipal, session: SessionDep) -> ExportJobPublic:
    return job_public(session, exportjobs.get_job(session, principal, job_id))


@router.post("/exports/{job_id}/cancel", operation_id="cancel_export", response_model=ExportJobPublic)
def cancel_export(job_id: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep) -> ExportJobPublic:
    return job_public(session, exportjobs.cancel(session, principal, job_id, now=ctx.clock.now()))


# --- base models ------------------------------------------------------------------------------
def base_public(
    session: Session, row: BaseModelRow, *, detail_at: datetime | None = None, viewer: Principal | None = None
) -> BaseModelPublic:
    """The public shape of a base model; with ``detail_at`` and ``viewer``, also its files and what
    uses it at that instant, as the viewer may see it (its own tenant's usage unless it is an admin)."""
    files = usage = None
    if detail_at is not None and viewer is not None:
        files = [
            BaseModelFileDecl(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256)
            for f in basemodels.files_of(session, row.name)
        ]
        usage = basemodels.usage_for(session, viewer, row.name, now=detail_at)
    return BaseModelPublic(
        name=row.name,
        architecture=row.architecture,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        files=files,
        usage=usage,
    )


@router.put(
    "/base-model-blobs/{sha256}",
    operation_id="put_base_model_blob",
    response_model=BlobReceipt,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def put_base_model_blob(
    sha256: str, size: Annotated[int, Query(ge=0)], request: Request, principal: AdminPrincipal, ctx: CtxDep
) -> BlobReceipt:
    """Send one base-model file (admin). Stored only if size and sha256 match; already-stored
    bytes are not sent again (the request body is drained and ignored)."""
    check_sha256(sha256)
    writer = await run_in_threadpool(basemodels.store_blob, ctx, principal, sha256, size)
    if writer is None:
        async for _ in request.stream():
            pass
        return BlobReceipt(sha256=sha256, size_bytes=size, sent=False)
    pending = bytearray()
    try:
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= STREAM_BATCH:
                data, pending = bytes(pending), bytearray()
                await anyio.to_thread.run_sync(writer.write, data)
        if pending:
            await anyio.to_thread.run_sync(writer.write, bytes(pending))
        await run_in_threadpool(basemodels.finish_blob, ctx, writer)
    except BaseException:
        await anyio.to_thread.run_sync(writer.abort)
        raise
    return BlobReceipt(sha256=sha256, size_bytes=size, sent=True)


@router.post("/base-models", operation_id="create_base_model", status_code=201, response_model=BaseModelPublic)
def create_base_model(body: BaseModelCreate, principal: AdminPrincipal, ctx: CtxDep, request: Request) -> BaseModelPublic:
    """Register a base model from its manifest. Files whose bytes are not stored yet are listed in
    a 400 ``upload_incomplete`` error (``details.missing``: sha256s to PUT to /v1/base-model-blobs)."""
    row = basemodels.register_manifest(
        ctx, principal, body.name, [(f.path, f.size_bytes, f.sha256) for f in body.files], request_id=request_id_of(request)
    )
    return BaseModelPublic(name=row.name, architecture=row.architecture, size_bytes=row.size_bytes, created_at=row.created_at)


@router.get("/base-models", operation_id="list_base_models", response_model=BaseModelsPublic)
def list_base_models(principal: CurrentPrincipal, session: SessionDep) -> BaseModelsPublic:
    return BaseModelsPublic(base_models=[base_public(session, r) for r in basemodels.list_base_models(session)])


@router.get("/base-models/{name:path}", operation_id="get_base_model", response_model=BaseModelPublic)
def get_base_model(name: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> BaseModelPublic:
    """A base model with its files and ``usage`` (visible checkpoints of runs on it, unfinished
    export jobs): counted over the caller's tenant, over every tenant only for admin keys."""
    return base_public(session, basemodels.get(session, name), detail_at=ctx.clock.now(), viewer=principal)


@router.delete("/base-models/{name:path}", operation_id="delete_base_model", status_code=204)
def delete_base_model(name: str, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep, request: Request) -> None:
    basemodels.remove(session, principal, name, now=ctx.clock.now(), request_id=request_id_of(request))
