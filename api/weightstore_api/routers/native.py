"""Native API for trainers and readers: runs, uploads (declare → transfer → commit), checkpoints, keys."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.concurrency import run_in_threadpool

from weightstore import auth, checkpoints, policies, runs, uploads
from weightstore.blobs import chunks as blob_chunks
from weightstore.db import session_scope
from weightstore.names import TinkerPath

from ..convert import checkpoint_public, key_public, run_public
from ..deps import AdminPrincipal, CtxDep, CurrentPrincipal, Offset, SessionDep, WriterPrincipal
from ..errors import request_id_of
from ..observability import BYTES_RECEIVED, CHECKPOINTS_COMMITTED
from ..schemas import (
    CheckpointPublic,
    CheckpointsPublic,
    CommitPublic,
    FileAnswerPublic,
    FileReceipt,
    FileUrlPublic,
    FileUrlsPublic,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    KeyRotate,
    KeyRotated,
    RunCreate,
    RunDeletedPublic,
    RunDetailPublic,
    RunKindPublic,
    RunPublic,
    RunsPublic,
    TTLUpdate,
    UploadCommit,
    UploadCreate,
    UploadFilesAdd,
    UploadFilesPublic,
    UploadLeasePublic,
    UploadPublic,
)

router = APIRouter(prefix="/v1", tags=["native"])
STREAM_BATCH = 8 * 1024 * 1024  # hop to a worker thread once per 8 MiB, not once per socket read


# --- runs -------------------------------------------------------------------------------------
@router.post("/runs", operation_id="create_run", status_code=201, response_model=RunPublic)
def create_run(body: RunCreate, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request) -> RunPublic:
    """A new run in the caller's run-id namespace: no ``run_id`` mints ``{uuid}:train:0``; a chosen
    id is kept when it starts with ``{tenant}:`` (or names one of the caller's Tinker sessions),
    else it becomes ``{tenant}:{run_id}``. The answer carries the id; ``already_exists`` only ever
    means the caller's own tenant holds it."""
    run = runs.create_run(
        session,
        principal,
        base_model=body.base_model,
        now=ctx.clock.now(),
        run_id=body.run_id,
        lora_rank=body.lora_rank,
        train_mlp=body.train_mlp,
        train_attn=body.train_attn,
        train_unembed=body.train_unembed,
        user_metadata=body.user_metadata,
    )
    return run_public(run)


@router.get("/runs", operation_id="list_runs", response_model=RunsPublic)
def list_runs(
    principal: CurrentPrincipal, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Offset = 0
) -> RunsPublic:
    rows, total = runs.list_runs(session, principal, limit=limit, offset=offset)
    return RunsPublic(runs=[run_public(r) for r in rows], total_count=total)


@router.get("/runs/{run_id}", operation_id="get_run", response_model=RunDetailPublic)
def get_run(run_id: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> RunDetailPublic:
    """The run with its visible checkpoints counted per kind, their logical bytes, and the export
    jobs of it still queued or running (issue 12, part 5)."""
    d = runs.run_detail(session, principal, run_id, now=ctx.clock.now())
    return RunDetailPublic(
        **run_public(d.run).model_dump(),
        checkpoint_count=d.checkpoint_count,
        size_bytes=d.size_bytes,
        kinds=[RunKindPublic(kind=k.kind, count=k.count, size_bytes=k.size_bytes) for k in d.kinds],
        active_exports=d.active_exports,
    )


@router.delete("/runs/{run_id}", operation_id="delete_run", response_model=RunDeletedPublic)
def delete_run(run_id: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request) -> RunDeletedPublic:
    """Delete the run and its checkpoints (each through the normal delete path; the collector
    reclaims the bytes). 400 ``invalid_request`` naming the jobs while exports of it are queued or running."""
    n = runs.delete_run(session, principal, run_id, now=ctx.clock.now(), request_id=request_id_of(request))
    return RunDeletedPublic(run_id=run_id, checkpoints_deleted=n)


# --- uploads ----------------------------------------------------------------------------------
@router.post("/uploads", operation_id="declare_upload", status_code=201, response_model=UploadPublic)
def declare_upload(body: UploadCreate, principal: WriterPrincipal, ctx: CtxDep) -> UploadPublic:
    req = uploads.UploadRequest(
        run_id=body.run_id,
        kind=body.kind,
        name=body.name,
        ttl_seconds=body.ttl_seconds,
        overwrite=body.overwrite,
        user_metadata=body.user_metadata,
        transfer=body.transfer,
        files=[uploads.DeclaredFile(f.path, f.size_bytes, f.sha256) for f in body.files],
        layout=body.layout,
    )
    ans = uploads.declare(ctx, principal, req)
    return UploadPublic(
        upload_id=ans.upload_id,
        expires_at=ans.expires_at,
        tinker_path=ans.tinker_path,
        bytes_to_send=ans.bytes_to_send,
        files=[FileAnswerPublic(**vars(f)) for f in ans.files],
        lease_seconds=ans.lease_seconds,
    )


@router.put(
    "/uploads/{upload_id}/files/{path:path}",
    operation_id="stream_upload_file",
    response_model=FileReceipt,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def stream_upload_file(upload_id: str, path: str, request: Request, principal: WriterPrincipal, ctx: CtxDep) -> FileReceipt:
    """Send one declared file's bytes through the service. The object becomes visible only if
    size and sha256 match the declaration."""
    writer = await run_in_threadpool(uploads.open_stream, ctx, principal, upload_id, path)
    pending: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= STREAM_BATCH:
                data, pending, size = b"".join(pending), [], 0
                await anyio.to_thread.run_sync(writer.write, data)
        if pending:
            await anyio.to_thread.run_sync(writer.write, b"".join(pending))
    except BaseException:
        await anyio.to_thread.run_sync(writer.abort)
        raise
    await run_in_threadpool(uploads.finish_stream, ctx, principal, upload_id, path, writer)
    BYTES_RECEIVED.inc(writer.received)
    return FileReceipt(path=path, size_bytes=writer.size, sha256=writer.sha256)


@router.get(
    "/uploads/{upload_id}/files/{path:path}/transfer", operation_id="get_upload_file_transfer", response_model=FileAnswerPublic
)
def get_upload_file_transfer(
    upload_id: str,
    path: str,
    principal: WriterPrincipal,
    ctx: CtxDep,
    first_part: Annotated[int, Query(ge=1, le=10_000)] = 1,
    count: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> FileAnswerPublic:
    """How to send one declared file now: a page of part URLs (at most ``presign_parts_batch``),
    or, after a commit answered ``upload_incomplete`` for it, where to send it again."""
    return FileAnswerPublic(**vars(uploads.transfer(ctx, principal, upload_id, path, first_part=first_part, count=count)))


@router.post("/uploads/{upload_id}/files", operation_id="add_upload_files", response_model=UploadFilesPublic)
def add_upload_files(upload_id: str, body: UploadFilesAdd, principal: WriterPrincipal, ctx: CtxDep) -> UploadFilesPublic:
    """Declare more files of an open upload (the ranks of a DCP save, issue 14 part 2); answers as declare."""
    files = [uploads.DeclaredFile(f.path, f.size_bytes, f.sha256) for f in body.files]
    answers = uploads.add_files(ctx, principal, upload_id, files, transfer=body.transfer)
    return UploadFilesPublic(upload_id=upload_id, files=[FileAnswerPublic(**vars(f)) for f in answers])


@router.post("/uploads/{upload_id}/commit", operation_id="commit_upload", response_model=CommitPublic)
def commit_upload(
    upload_id: str, principal: WriterPrincipal, ctx: CtxDep, request: Request, body: UploadCommit | None = None
) -> CommitPublic:
    expect = body.expect_files if body is not None else None
    res = uploads.commit(ctx, principal, upload_id, request_id=request_id_of(request), expect_files=expect)
    if not res.replayed:  # a repeated commit (the client's answer was lost) counts once
        CHECKPOINTS_COMMITTED.labels(res.checkpoint.kind).inc()
    with session_scope(ctx.engine) as session:
        layout = checkpoints.layouts(session, [res.checkpoint])[res.checkpoint.id]
    checkpoint = checkpoint_public(res.checkpoint, layout=layout)
    return CommitPublic(tinker_path=res.tinker_path, checkpoint=checkpoint, bytes_received=res.bytes_received)


@router.post("/uploads/{upload_id}/renew", operation_id="renew_upload", response_model=UploadLeasePublic)
def renew_upload(upload_id: str, principal: WriterPrincipal, ctx: CtxDep) -> UploadLeasePublic:
    """Keep an open upload alive for another lease (its client calls this while sending)."""
    expires_at = uploads.renew(ctx, principal, upload_id)
    return UploadLeasePublic(upload_id=upload_id, expires_at=expires_at, lease_seconds=ctx.settings.upload_lease_seconds)


@router.delete("/uploads/{upload_id}", operation_id="abort_upload", status_code=204)
def abort_upload(upload_id: str, principal: WriterPrincipal, ctx: CtxDep) -> None:
    uploads.abort(ctx, principal, upload_id)


# --- checkpoints ------------------------------------------------------------------------------
@router.get("/checkpoints", operation_id="list_checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    run_id: str | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> CheckpointsPublic:
    rows, total = checkpoints.list_checkpoints(
        session, principal, now=ctx.clock.now(), run_id=run_id, kind=kind, limit=limit, offset=offset
    )
    effective = policies.effective_for_runs(session, {c.run_id for c in rows})
    layouts = checkpoints.layouts(session, rows)
    return CheckpointsPublic(
        checkpoints=[checkpoint_public(c, policy=effective.get(c.run_id), layout=layouts[c.id]) for c in rows],
        total_count=total,
    )


@router.get("/checkpoints/{run_id}/{segment}/{name}", operation_id="get_checkpoint", response_model=CheckpointPublic)
def get_checkpoint(
    run_id: str, segment: str, name: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep
) -> CheckpointPublic:
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    ckpt = checkpoints.get_for(session, principal, path, now=ctx.clock.now(), allow_public=True)
    return checkpoint_public(ckpt, session)


@router.get(
    "/checkpoints/{run_id}/{segment}/{name}/files", operation_id="get_checkpoint_file_urls", response_model=FileUrlsPublic
)
def get_checkpoint_file_urls(
    run_id: str,
    segment: str,
    name: str,
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    background: BackgroundTasks,
) -> FileUrlsPublic:
    """Short-lived presigned GET URLs, one per file, with size and sha256 to verify against, and
    per-chunk sha256s where recorded; files without them get them computed after this answer
    (``blobs.chunks.backfill``), so the next load verifies in parallel."""
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    now = ctx.clock.now()
    ckpt = checkpoints.get_for(session, principal, path, now=now, allow_public=True)
    urls = checkpoints.download_urls(session, ckpt, store=ctx.store, settings=ctx.settings, now=now)
    if lacking := [u.sha256 for u in urls if u.chunk_sha256 is None]:
        background.add_task(blob_chunks.backfill, ctx, lacking)
    return FileUrlsPublic(tinker_path=str(path), files=[FileUrlPublic(**vars(u)) for u in urls])


@router.delete("/checkpoints/{run_id}/{segment}/{name}", operation_id="delete_checkpoint", status_code=204)
def delete_checkpoint(
    run_id: str, segment: str, name: str, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> None:
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    checkpoints.delete(session, principal, path, now=ctx.clock.now(), request_id=request_id_of(request))


@router.put("/checkpoints/{run_id}/{segment}/{name}/ttl", operation_id="set_checkpoint_ttl", response_model=CheckpointPublic)
def set_checkpoint_ttl(
    run_id: str,
    segment: str,
    name: str,
    body: TTLUpdate,
    principal: WriterPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    request: Request,
) -> CheckpointPublic:
    path = TinkerPath.from_checkpoint_id(run_id, f"{segment}/{name}")
    ckpt = checkpoints.set_ttl(
        session, principal, path, body.ttl_seconds, settings=ctx.settings, now=ctx.clock.now(), request_id=request_id_of(request)
    )
    return checkpoint_public(ckpt)


# --- keys -------------------------------------------------------------------------------------
@router.post("/keys", operation_id="create_key", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, principal: AdminPrincipal, ctx: CtxDep, session: SessionDep) -> KeyCreated:
    row, plaintext = auth.create_key(
        session, tenant=body.tenant, role=body.role, now=ctx.clock.now(), name=body.name, create_tenant=body.create_tenant
    )
    return KeyCreated(**key_public(row).model_dump(), api_key=plaintext)


@router.get("/keys", operation_id="list_keys", response_model=list[KeyPublic])
def list_keys(principal: CurrentPrincipal, session: SessionDep) -> list[KeyPublic]:
    rows = auth.list_keys(session, tenant_id=None if principal.is_admin else principal.tenant_id)
    return [key_public(r) for r in rows]


@router.delete("/keys/{key_id}", operation_id="revoke_key", response_model=KeyPublic)
def revoke_key(key_id: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> KeyPublic:
    """Who may revoke which key is decided in one place, ``auth.revoke_key`` (any key may revoke itself)."""
    return key_public(auth.revoke_key(session, key_id=key_id, principal=principal, now=ctx.clock.now()))


@router.post("/keys/{key_id}/rotate", operation_id="rotate_key", status_code=201, response_model=KeyRotated)
def rotate_key(
    key_id: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep, body: KeyRotate | None = None
) -> KeyRotated:
    """A new key of the same tenant, role and name; the old one stops working after ``grace_seconds``.
    Whoever may revoke a key may rotate it (``auth.rotate_key``)."""
    grace = body.grace_seconds if body is not None else 0
    new, plaintext, old = auth.rotate_key(session, key_id=key_id, principal=principal, now=ctx.clock.now(), grace_seconds=grace)
    return KeyRotated(**key_public(new).model_dump(), api_key=plaintext, replaced=key_public(old))
