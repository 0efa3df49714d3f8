"""Core logic behind the Tinker-compatible REST surface (``/api/v1``): everything the HTTP layer
needs beyond the plain checkpoint service functions.

- **Views**: which runs and checkpoints a caller may see through Tinker's ``access_scope``:
  ``owned`` = the caller's tenant; ``accessible`` = owned plus other tenants' runs that have at
  least one *published* checkpoint (of those runs, only the published checkpoints are visible).
- **Publish / unpublish**: owner only (anyone else gets ``NotFound``), ``Conflict`` (409, as
  Tinker documents) when the checkpoint is already in that state.
- **copy_weights**: zero-copy. A new run that cannot be trained on, new checkpoint rows whose
  manifest points at the *same* blobs, a ``tenant_blob`` proof for the destination tenant, a
  ledger ``commit`` for the copy, its own TTL. De-duplicated on ``X-Idempotency-Key`` through
  ``idempotency_record`` (the SDK reuses one key across all of its retry layers).
- **weights_info**: base model and LoRA shape of a checkpoint, from its run and its
  ``adapter_config.json``.
- Sessions and futures of the download flow live in the sibling ``tinker_sessions``.
- **Legacy archive**: a deterministic tar of the adapter files, stored as a content-addressed blob
  that nothing references (the collector reclaims it after the grace period).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, select

from weightstore import audit, checkpoints, ledger, runs, uploads
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import Conflict, InvalidRequest, NotFound, Unsupported
from weightstore.formats import ADAPTER_CONFIG, OPTIMIZER_STATE
from weightstore.models import (
    AuditEvent,
    Blob,
    BlobState,
    Checkpoint,
    CheckpointFile,
    IdempotencyRecord,
    TrainingRun,
)
from weightstore.names import TinkerPath, check_run_id, new_id
from weightstore.objectstore import blob_key

TINKER_KINDS = ("training", "sampler", "external")
"""The kinds Tinker's ``CheckpointType`` knows; native kinds (``merged``) are left out of Tinker
lists because the SDK validates responses strictly and would reject an unknown literal."""

ATTN_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "in_proj_q", "in_proj_k", "in_proj_v"}
MLP_MODULES = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate_up_proj", "experts", "fc1", "fc2"}
UNEMBED_MODULES = {"lm_head", "unembed_tokens", "embed_tokens"}


# --- views ------------------------------------------------------------------------------------


def _public_run_ids(now: datetime) -> Any:
    return (
        select(Checkpoint.run_id)
        .where(
            Checkpoint.public.is_(True),
            checkpoints.visible_clause(now),  # type: ignore[attr-defined]
            Checkpoint.kind.in_(TINKER_KINDS),
        )
        .distinct()
    )  # type: ignore[attr-defined]


def _check_scope(access_scope: str) -> None:
    if access_scope not in {"owned", "accessible"}:
        raise InvalidRequest("access_scope must be 'owned' or 'accessible'")


def get_run(session: Session, principal: Principal, run_id: str, *, now: datetime, access_scope: str = "owned") -> TrainingRun:
    """A run the caller owns, or (``accessible``) one with a published checkpoint."""
    _check_scope(access_scope)
    run = session.get(TrainingRun, run_id)
    if run is not None and run.tenant_id == principal.tenant_id:
        return run
    if (
        run is not None
        and access_scope == "accessible"
        and session.exec(_public_run_ids(now).where(Checkpoint.run_id == run_id)).first() is not None
    ):
        return run
    raise NotFound(f"training run {run_id!r} not found")


def list_runs(
    session: Session, principal: Principal, *, now: datetime, limit: int, offset: int, access_scope: str = "owned"
) -> tuple[list[TrainingRun], int]:
    """Newest first. Returns (page, total)."""
    _check_scope(access_scope)
    q = select(TrainingRun)
    if access_scope == "owned":
        q = q.where(TrainingRun.tenant_id == principal.tenant_id)
    else:
        q = q.where(
            sa.or_(
                TrainingRun.tenant_id == principal.tenant_id,  # type: ignore[arg-type]
                TrainingRun.id.in_(_public_run_ids(now)),
            )
        )  # type: ignore[attr-defined]
    total = session.exec(select(sa.func.count()).select_from(q.subquery())).one()
    rows = session.exec(
        q.order_by(TrainingRun.created_at.desc(), TrainingRun.id.desc())  # type: ignore[attr-defined]
        .offset(offset)
        .limit(limit)
    ).all()
    return list(rows), int(total)


def _run_checkpoints_query(principal: Principal, run: TrainingRun, now: datetime) -> Any:
    q = select(Checkpoint).where(Checkpoint.run_id == run.id, checkpoints.visible_clause(now), Checkpoint.kind.in_(TINKER_KINDS))  # type: ignore[attr-defined]
    if run.tenant_id != principal.tenant_id:
        q = q.where(Checkpoint.public.is_(True))  # type: ignore[attr-defined]
    return q.order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())  # type: ignore[attr-defined]


def run_checkpoints(session: Session, principal: Principal, run: TrainingRun, *, now: datetime) -> list[Checkpoint]:
    """All visible Tinker-kind checkpoints of a run the caller may see, newest first."""
    return list(session.exec(_run_checkpoints_query(principal, run, now)).all())


def last_checkpoint(session: Session, principal: Principal, run: TrainingRun, kind: str, *, now: datetime) -> Checkpoint | None:
    return session.exec(_run_checkpoints_query(principal, run, now).where(Checkpoint.kind == kind).limit(1)).first()


def user_checkpoints(
    session: Session, principal: Principal, *, now: datetime, limit: int, offset: int
) -> tuple[list[Checkpoint], int]:
    """All of the caller's visible Tinker-kind checkpoints, newest first. Returns (page, total)."""
    q = select(Checkpoint).where(
        Checkpoint.tenant_id == principal.tenant_id, checkpoints.visible_clause(now), Checkpoint.kind.in_(TINKER_KINDS)
    )  # type: ignore[attr-defined]
    total = session.exec(select(sa.func.count()).select_from(q.subquery())).one()
    rows = session.exec(
        q.order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())  # type: ignore[attr-defined]
        .offset(offset)
        .limit(limit)
    ).all()
    return list(rows), int(total)


# --- publish ----------------------------------------------------------------------------------


def set_public(
    session: Session, principal: Principal, path: TinkerPath, public: bool, *, now: datetime, request_id: str | None = None
) -> Checkpoint:
    """Owner only: another tenant's checkpoint is "not found", published or not."""
    principal.require_write()
    ckpt = checkpoints.get_for(session, principal, path, now=now)
    if ckpt.public == public:
        raise Conflict(f"checkpoint {path} is already {'public' if public else 'private'}")
    ckpt.public = public
    session.add(ckpt)
    audit.record(
        session,
        at=now,
        action="checkpoint.publish" if public else "checkpoint.unpublish",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=str(path),
        request_id=request_id,
    )
    return ckpt


# --- weights info -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    base_model: str
    is_lora: bool
    lora_rank: int | None
    train_unembed: bool | None
    train_mlp: bool | None
    train_attn: bool | None


def _adapter_config(ctx: Context, session: Session, ckpt: Checkpoint) -> dict[str, Any] | None:
    row = session.get(CheckpointFile, (ckpt.id, ADAPTER_CONFIG))
    if row is None or row.size_bytes > ctx.settings.max_json_file_bytes:
        return None
    try:
        value = json.loads(ctx.store.read_bytes(blob_key(row.sha256)))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def weights_info(ctx: Context, session: Session, principal: Principal, path: TinkerPath) -> WeightsInfo:
    """Readable for the owner and, for published checkpoints, for everyone."""
    ckpt = checkpoints.get_for(session, principal, path, now=ctx.clock.now(), allow_public=True)
    run = session.get(TrainingRun, ckpt.run_id)
    assert run is not None
    config = _adapter_config(ctx, session, ckpt) or {}
    rank = config.get("r") if isinstance(config.get("r"), int) else run.lora_rank
    mlp, attn, unembed = run.train_mlp, run.train_attn, run.train_unembed
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        leaves = {str(t).rsplit(".", 1)[-1] for t in targets}
        mlp, attn, unembed = bool(leaves & MLP_MODULES), bool(leaves & ATTN_MODULES), bool(leaves & UNEMBED_MODULES)
    return WeightsInfo(
        base_model=run.base_model, is_lora=True, lora_rank=rank, train_unembed=unembed, train_mlp=mlp, train_attn=attn
    )


# --- idempotency records (also the home of sessions, models and futures) -----------------------


def _record(session: Session, tenant_id: str, key: str) -> IdempotencyRecord | None:
    return session.get(IdempotencyRecord, (tenant_id, key))


def _put_record(
    session: Session, tenant_id: str, key: str, operation: str, response: dict[str, Any], now: datetime
) -> IdempotencyRecord:
    row = _record(session, tenant_id, key)
    if row is None:
        row = IdempotencyRecord(tenant_id=tenant_id, key=key, operation=operation, created_at=now, response=response)
    else:
        row.response = response
    session.add(row)
    return row


# --- copy_weights -----------------------------------------------------------------------------


def _share_checkpoint(
    session: Session,
    principal: Principal,
    source: Checkpoint,
    run: TrainingRun,
    *,
    name: str,
    ttl_seconds: int | None,
    now: datetime,
    request_id: str | None,
    kind: str | None = None,
) -> Checkpoint:
    """New checkpoint rows in ``run`` pointing at the source's blobs: no byte moves."""
    files = checkpoints.files_of(session, source)
    shas = sorted({f.sha256 for f in files})
    blob_q = select(Blob).where(Blob.sha256.in_(shas))  # type: ignore[attr-defined]
    if session.get_bind().dialect.name == "postgresql":
        blob_q = blob_q.with_for_update()  # same row locks as the collector's tombstone
    blobs = {b.sha256: b for b in session.exec(blob_q).all()}
    if any((b := blobs.get(s)) is None or b.state != BlobState.live for s in shas):
        raise NotFound(f"checkpoint {checkpoints.tinker_path(source)} is being collected")
    ckpt = Checkpoint(
        id=new_id("ckpt"),
        tenant_id=principal.tenant_id,
        run_id=run.id,
        kind=kind or source.kind,
        name=name,
        size_bytes=source.size_bytes,
        created_at=now,
        expires_at=checkpoints.expires_at_for(now, ttl_seconds),
        user_metadata=source.user_metadata,
        copied_from_id=source.id,
    )
    session.add(ckpt)
    session.flush()
    uploads.add_manifest(session, ckpt, [(f.path, f.size_bytes, f.sha256) for f in files], blobs, now=now)
    ledger.on_commit(session, ckpt, now=now)
    audit.record(
        session,
        at=now,
        action="checkpoint.copy",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=checkpoints.tinker_path(ckpt),
        request_id=request_id,
        source=checkpoints.tinker_path(source),
        size_bytes=ckpt.size_bytes,
    )
    return ckpt


def _copy_once(
    ctx: Context,
    principal: Principal,
    source_path: TinkerPath,
    *,
    ttl_seconds: int | None,
    run_id: str | None,
    idempotency_key: str | None,
    request_id: str | None,
) -> str:
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        if idempotency_key:
            done = _record(session, principal.tenant_id, idempotency_key)
            if done is not None and done.operation == "copy_weights" and done.response:
                return str(done.response["tinker_path"])
        source = checkpoints.get_for(session, principal, source_path, now=now, allow_public=True)
        src_run = session.get(TrainingRun, source.run_id)
        assert src_run is not None
        run = runs.create_run(
            session,
            principal,
            base_model=src_run.base_model,
            now=now,
            run_id=run_id,
            lora_rank=src_run.lora_rank,
            train_mlp=src_run.train_mlp,
            train_attn=src_run.train_attn,
            train_unembed=src_run.train_unembed,
            user_metadata=src_run.user_metadata if src_run.tenant_id == principal.tenant_id else None,
            trainable=False,
            copied_from_run_id=src_run.id,
        )
        ckpt = _share_checkpoint(
            session, principal, source, run, name=source.name, ttl_seconds=ttl_seconds, now=now, request_id=request_id
        )
        path = checkpoints.tinker_path(ckpt)
        if idempotency_key:
            _put_record(session, principal.tenant_id, idempotency_key, "copy_weights", {"tinker_path": path}, now)
        session.flush()
    return path


def copy_weights(
    ctx: Context,
    principal: Principal,
    source_path: str,
    *,
    ttl_seconds: int | None = None,
    run_id: str | None = None,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> str:
    """Copy a checkpoint (own or published) into a new, non-trainable run. Returns the new path.

    The same ``idempotency_key`` always answers the first copy's path: a retry whose first attempt
    did commit (the answer was lost) does not make a second copy.
    """
    principal.require_write()
    checkpoints.check_ttl(ctx.settings, ttl_seconds)
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
        raise InvalidRequest("X-Idempotency-Key must be 1..200 characters")
    path = TinkerPath.parse(source_path)
    if run_id is not None:
        check_run_id(run_id)
    if idempotency_key is not None:  # own namespace: sessions/futures share the table
        idempotency_key = f"copy:{idempotency_key}"
    try:
        return _copy_once(
            ctx, principal, path, ttl_seconds=ttl_seconds, run_id=run_id, idempotency_key=idempotency_key, request_id=request_id
        )
    except DBIntegrityError:
        # Two attempts with the same key raced; the loser answers the winner's result.
        if idempotency_key is None:
            raise
        with session_scope(ctx.engine) as session:
            done = _record(session, principal.tenant_id, idempotency_key)
            if done is None or not done.response:
                raise
            return str(done.response["tinker_path"])


# --- audit ------------------------------------------------------------------------------------

AUDIT_EVENT_PREFIXES = {
    "checkpoints": ("checkpoint.",),
    "projects": ("project.",),
    "teams": ("team.",),
    "organizations": ("organization.", "tenant.", "key."),
}


def audit_entries(
    session: Session, *, event_type: str = "all", day: datetime | None = None, limit: int = 1000
) -> list[AuditEvent]:
    """Audit events (all tenants: admin only), newest first, optionally for one UTC day."""
    if event_type != "all" and event_type not in AUDIT_EVENT_PREFIXES:
        raise InvalidRequest(f"event_type must be one of all, {', '.join(AUDIT_EVENT_PREFIXES)}")
    q = select(AuditEvent)
    if event_type != "all":
        q = q.where(sa.or_(*[AuditEvent.action.startswith(p) for p in AUDIT_EVENT_PREFIXES[event_type]]))  # type: ignore[attr-defined,arg-type]
    if day is not None:
        q = q.where(AuditEvent.at >= day, AuditEvent.at < day + timedelta(days=1))  # type: ignore[operator]
    return list(session.exec(q.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)).all())  # type: ignore[attr-defined,union-attr]


# --- legacy archive ---------------------------------------------------------------------------

ARCHIVE_MARKER = "checkpoint_complete"


@dataclass(frozen=True)
class ArchiveUrl:
    url: str
    expires_at: datetime
    sha256: str
    size_bytes: int


def archive_url(ctx: Context, principal: Principal, path: TinkerPath) -> ArchiveUrl:
    """Build (once per content) an uncompressed tar of the adapter files plus ``checkpoint_complete``
    at its root, store it as a content-addressed blob and hand out a presigned GET.

    The tar is deterministic (sorted members, mtime 0, root owner), so the same checkpoint always
    gives the same sha256 and a second request reuses the stored object. Nothing references the
    blob row, so the collector reclaims it after the grace period; the URL lives far shorter.
    """
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        ckpt = checkpoints.get_for(session, principal, path, now=now, allow_public=True)
        if ckpt.kind == "merged":
            raise Unsupported("archives are built for LoRA checkpoints only; use the native file URLs")
        files = [(f.path, f.sha256, f.size_bytes) for f in checkpoints.files_of(session, ckpt) if f.path != OPTIMIZER_STATE]
        for _, sha, _size in files:
            blob = session.get(Blob, sha)
            if blob is None or blob.state != BlobState.live:
                raise NotFound(f"checkpoint {path} is being collected")
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, sha, size in sorted(files):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = size, 0, 0o644
                tar.addfile(info, _ChunkReader(ctx, blob_key(sha)))
            marker = tarfile.TarInfo(ARCHIVE_MARKER)
            marker.mtime, marker.mode = 0, 0o644
            tar.addfile(marker, io.BytesIO(b""))
        size = spool.tell()
        spool.seek(0)
        h = hashlib.sha256()
        while data := spool.read(8 * 1024 * 1024):
            h.update(data)
        sha = h.hexdigest()
        key = blob_key(sha)
        if ctx.store.head(key) is None:
            spool.seek(0)
            ctx.store.upload_fileobj(key, spool)
            got, got_size = ctx.store.hash_object(key)
            if got != sha or got_size != size:
                raise NotFound("archive could not be stored intact; retry")
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        blob = session.get(Blob, sha)
        if blob is None:
            session.add(
                Blob(sha256=sha, size_bytes=size, state=BlobState.live, created_at=now, verified_at=now, last_referenced_at=now)
            )
        elif blob.state == BlobState.live:
            blob.last_referenced_at = now
            session.add(blob)
        else:
            raise NotFound("archive is being collected; retry")
        audit.record(
            session, at=now, action="checkpoint.archive", tenant_id=principal.tenant_id, key_id=principal.key_id, target=str(path)
        )
    ttl = ctx.settings.presign_ttl_seconds
    return ArchiveUrl(ctx.store.presign_get(key, ttl, filename="archive.tar"), now + timedelta(seconds=ttl), sha, size)


class _ChunkReader(io.RawIOBase):
    """A file-like view of an object, read in chunks (``tarfile`` pulls ``size`` bytes)."""

    def __init__(self, ctx: Context, key: str) -> None:
        self._chunks = ctx.store.iter_chunks(key)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        while n < 0 or len(self._buf) < n:
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            self._buf += nxt
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out
