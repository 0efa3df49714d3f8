"""Registered base models: Hugging Face layouts stored in the same content-addressed blob store.

A base model is a name plus a manifest (``base_model_file``: relative path → blob sha256), exactly
like a checkpoint. Registration goes through the same write order as an upload (rule S2, via
``blobs``): object durable at ``blob_key(sha)`` with its sha256 checked → blob row ``live`` →
manifest committed, in one transaction that re-checks the blobs (``blobs.lock_live``). Content
already stored (a second name for the same weights, a shared tokenizer) moves zero bytes.

Export workers *materialise* a base model into a local cache keyed by sha256 (one file per blob,
written to a temp name and renamed only after its sha256 matched), so a model used by many jobs
is downloaded once per machine, and a corrupted object in the store fails the job loudly instead of
producing a silently wrong merge.

``register``, ``store_blob``, ``finish_blob``, ``register_manifest`` and ``materialise`` are
workflows (object-store I/O between short transactions); the others are catalog functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore import audit, blobs
from weightstore.auth import Principal
from weightstore.checkpoints import visible_clause
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import (
    AlreadyExists,
    CatalogBusy,
    InUse,
    InvalidName,
    InvalidRequest,
    NotFound,
    UploadIncomplete,
)
from weightstore.hashing import sha256_file
from weightstore.models import BaseModel, BaseModelFile, Checkpoint, ExportJob, ExportJobState, TrainingRun
from weightstore.names import check_file_path, check_sha256
from weightstore.objectstore import blob_key

Progress = blobs.Progress
# Hugging Face repo ids ("org/name") are the natural names; ".." and empty segments are refused so a
# name can never be mistaken for a path.
BASE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
# Which files of a model directory are part of the model. Anything else (README, .git, pickled
# *.bin weights, optimizer leftovers) is ignored rather than uploaded.
_INCLUDE = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors|.*\.safetensors\.index\.json|tokenizer.*|"
    r"special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|"
    r".*\.tiktoken|preprocessor_config\.json)$"
)
ACTIVE_JOB_STATES = tuple(s.value for s in ExportJobState.active())
"""Export jobs in these states still need their base model (``remove`` refuses)."""


def check_base_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= 200
        or not BASE_NAME_RE.match(name)
        or any(seg in {".", ".."} for seg in name.split("/"))
    ):
        raise InvalidName(
            f"base model name {name!r} must be 1..200 characters of letters, digits, '.', '_', '-' "
            "in '/'-separated segments (like a Hugging Face repo id)"
        )
    return name


def scan_dir(directory: Path) -> list[blobs.LocalFile]:
    """The model files of a Hugging Face layout directory, hashed. Refuses a directory that is not
    a safetensors model (no config.json, no shards, an index naming a missing shard)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidRequest(f"{directory} is not a directory")
    out: list[blobs.LocalFile] = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or rel.startswith(".") or "/." in rel or not _INCLUDE.match(p.name):
            continue
        check_file_path(rel)
        out.append(blobs.LocalFile(rel, p, p.stat().st_size, sha256_file(p)))
    paths = {f.path for f in out}
    if "config.json" not in paths:
        raise InvalidRequest(f"{directory}: no config.json (expected a Hugging Face model directory)")
    shards = {p for p in paths if p.endswith(".safetensors")}
    if not shards:
        raise InvalidRequest(f"{directory}: no *.safetensors weights (pickled *.bin weights are not supported)")
    for index in (p for p in paths if p.endswith(".safetensors.index.json")):
        try:
            weight_map = json.loads((directory / index).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"{index}: not a valid safetensors index ({exc})") from exc
        missing = sorted(set(weight_map.values()) - shards)
        if missing:
            raise InvalidRequest(f"{index} names shards that are not in the directory: {', '.join(missing)}")
    return out


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError as exc:
        raise InvalidRequest(f"{directory}/config.json is not valid JSON") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{directory}/config.json is not a JSON object")
    return config


def register(
    ctx: Context,
    principal: Principal,
    name: str,
    directory: str | Path,
    *,
    progress: Progress | None = None,
    request_id: str | None = None,
) -> BaseModel:
    """Upload a local Hugging Face directory as base model ``name`` (admin only; in-process use). Workflow."""
    principal.require_admin()
    check_base_name(name)
    directory = Path(directory)
    with session_scope(ctx.engine) as session:
        if session.get(BaseModel, name) is not None:
            raise AlreadyExists(f"base model {name!r} is already registered (remove it first)")
    files = scan_dir(directory)
    config = _read_config(directory)
    sent = sum(blobs.store_file(ctx, f, progress=progress) for f in files)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        _, not_live = blobs.lock_live(session, [f.sha256 for f in files])
        if not_live:
            raise CatalogBusy(f"{len(not_live)} file(s) were garbage-collected while being registered; retry")
        return _commit_manifest(
            session,
            principal,
            name,
            [(f.path, f.size_bytes, f.sha256) for f in files],
            config,
            now=now,
            request_id=request_id,
            bytes_sent=sent,
        )


def store_blob(ctx: Context, principal: Principal, sha256: str, size: int) -> blobs.BlobWriter | None:
    """Start receiving one base-model file through the service (admin only). ``None``: a live blob
    already holds these bytes (now touched) and nothing needs to move. Workflow."""
    principal.require_admin()
    with session_scope(ctx.engine) as session:
        live = blobs.reusable(session, sha256)
        if live is not None:
            blobs.touch(session, [sha256], ctx.clock.now())
            return None
    return blobs.open_writer(ctx, sha256, size)


def finish_blob(ctx: Context, writer: blobs.BlobWriter) -> None:
    """Verify and publish a blob received by ``store_blob``, then mark it live (write order S2). Workflow."""
    writer.finish()
    with session_scope(ctx.engine) as session:
        blobs.mark_live(session, writer.sha256, writer.size, ctx.clock.now(), chunk_digests=writer.chunk_digests)


def register_manifest(
    ctx: Context, principal: Principal, name: str, files: list[tuple[str, int, str]], *, request_id: str | None = None
) -> BaseModel:
    """Register a manifest (path, size, sha256) whose blobs were sent with ``store_blob``. Files not
    yet live are named in an ``UploadIncomplete`` error (``details.missing``: their sha256s). Workflow."""
    principal.require_admin()
    check_base_name(name)
    paths = [f[0] for f in files]
    for path, size, sha in files:
        check_file_path(path)
        check_sha256(sha)
        if not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"{path}: size must be a non-negative integer")
    if len(set(paths)) != len(paths):
        raise InvalidRequest("duplicate file paths")
    if "config.json" not in paths or not any(p.endswith(".safetensors") for p in paths):
        raise InvalidRequest("a base model needs config.json and *.safetensors weights")
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        if session.get(BaseModel, name) is not None:
            raise AlreadyExists(f"base model {name!r} is already registered (remove it first)")
        live, _ = blobs.lock_live(session, [sha for _, _, sha in files])
        missing = [sha for _path, size, sha in files if sha not in live or live[sha].size_bytes != size]
    if missing:
        raise UploadIncomplete(f"{len(missing)} file(s) must be sent first", missing=sorted(set(missing)))
    cfg_entry = next(f for f in files if f[0] == "config.json")
    if cfg_entry[1] > ctx.settings.max_json_file_bytes:
        raise InvalidRequest("config.json is too large")
    try:
        config = json.loads(ctx.store.read_bytes(blob_key(cfg_entry[2])))
    except ValueError as exc:
        raise InvalidRequest("config.json is not valid JSON") from exc
    if not isinstance(config, dict):
        raise InvalidRequest("config.json is not a JSON object")
    with session_scope(ctx.engine) as session:
        if session.get(BaseModel, name) is not None:
            raise AlreadyExists(f"base model {name!r} is already registered (remove it first)")
        _, not_live = blobs.lock_live(session, [sha for _, _, sha in files])
        if not_live:  # collected meanwhile: send again
            raise UploadIncomplete("a file was garbage-collected meanwhile; send it again", missing=not_live[:1])
        return _commit_manifest(session, principal, name, files, config, now=now, request_id=request_id)


def _commit_manifest(
    session: Session,
    principal: Principal,
    name: str,
    files: list[tuple[str, int, str]],
    config: dict[str, Any],
    *,
    now: datetime,
    request_id: str | None = None,
    **details: Any,
) -> BaseModel:
    """Insert the base model row and its manifest over blobs the caller checked live, touch them
    and record the audit row."""
    if session.get(BaseModel, name) is not None:
        raise AlreadyExists(f"base model {name!r} is already registered (remove it first)")
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else config.get("model_type")
    row = BaseModel(
        name=name,
        architecture=str(arch)[:128] if arch else None,
        size_bytes=sum(f[1] for f in files),
        created_at=now,
        config=config,
    )
    session.add(row)
    session.flush()
    for path, size, sha in files:
        session.add(BaseModelFile(base_model=name, path=path, size_bytes=size, sha256=sha))
    blobs.touch(session, [f[2] for f in files], now)
    audit.record(
        session,
        at=now,
        action="base_model.register",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=name,
        request_id=request_id,
        files=len(files),
        size_bytes=row.size_bytes,
        **details,
    )
    session.flush()
    return row


def list_base_models(session: Session) -> list[BaseModel]:
    return list(session.exec(select(BaseModel).order_by(BaseModel.name)).all())


def get(session: Session, name: str) -> BaseModel:
    row = session.get(BaseModel, name)
    if row is None:
        known = [b.name for b in list_base_models(session)]
        raise NotFound(f"base model {name!r} is not registered (registered: {', '.join(known) or 'none'})")
    return row


def files_of(session: Session, name: str) -> list[BaseModelFile]:
    return list(session.exec(select(BaseModelFile).where(BaseModelFile.base_model == name).order_by(BaseModelFile.path)).all())


def usage(session: Session, name: str, *, now: datetime, tenant_id: str | None) -> dict[str, int]:
    """What still uses a base model: visible checkpoints of runs trained on it, and unfinished jobs.

    ``tenant_id`` counts only that tenant's (what a non-admin key is shown: another tenant's
    activity is not its business, issue 11 item 1); ``None`` counts every tenant's (admins, and
    ``remove``'s in-use check). Keyword-only and required, so no caller gets the global count by
    forgetting to scope it."""
    ckpt_q = (
        select(sa.func.count())
        .select_from(Checkpoint)
        .join(TrainingRun, col(TrainingRun.id) == col(Checkpoint.run_id))
        .where(TrainingRun.base_model == name, visible_clause(now))
    )
    job_q = (
        select(sa.func.count())
        .select_from(ExportJob)
        .where(ExportJob.base_model == name, col(ExportJob.state).in_(ACTIVE_JOB_STATES))
    )
    if tenant_id is not None:
        ckpt_q = ckpt_q.where(Checkpoint.tenant_id == tenant_id)
        job_q = job_q.where(ExportJob.tenant_id == tenant_id)
    return {"checkpoints": int(session.exec(ckpt_q).one()), "active_jobs": int(session.exec(job_q).one())}


def usage_for(session: Session, principal: Principal, name: str, *, now: datetime) -> dict[str, int]:
    """``usage`` as ``principal`` may see it: every tenant's for an admin, its own tenant's otherwise."""
    return usage(session, name, now=now, tenant_id=None if principal.is_admin else principal.tenant_id)


def remove(session: Session, principal: Principal, name: str, *, now: datetime, request_id: str | None = None) -> None:
    """Unregister a base model. Refused (``InUse``) while checkpoints of runs on it are visible or
    jobs that use it are unfinished. The blobs become garbage after the collector's grace period."""
    principal.require_admin()
    get(session, name)
    used = usage(session, name, now=now, tenant_id=None)
    if used["checkpoints"] or used["active_jobs"]:
        raise InUse(
            f"base model {name!r} is still used by {used['checkpoints']} checkpoint(s) and "
            f"{used['active_jobs']} unfinished export job(s)",
            **used,
        )
    blobs.touch(session, [f.sha256 for f in files_of(session, name)], now)
    session.execute(sa.delete(BaseModelFile).where(col(BaseModelFile.base_model) == name))
    session.execute(sa.delete(BaseModel).where(col(BaseModel.name) == name))
    audit.record(
        session,
        at=now,
        action="base_model.remove",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=name,
        request_id=request_id,
    )


# --- materialise ------------------------------------------------------------------------------


def cache_root(ctx: Context) -> Path:
    return Path(ctx.settings.data_dir) / "cache"


def materialise(ctx: Context, name: str, *, root: Path | None = None, progress: Progress | None = None) -> Path:
    """A local directory holding base model ``name``, every file's sha256 verified.

    Blobs are cached as ``root/blobs/<sha>`` (reused by every model and job on this machine); the
    model directory is ``root/models/<manifest digest>/`` with hard links (copies across devices)
    to them, built in a temp dir and renamed into place, so a half-built directory is never seen.
    Workflow.
    """
    root = Path(root or cache_root(ctx))
    with session_scope(ctx.engine) as session:
        get(session, name)
        files = [(f.path, f.size_bytes, f.sha256) for f in files_of(session, name)]
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]
    model_dir = root / "models" / digest
    if (model_dir / ".complete").exists():
        if progress:
            progress(sum(f[1] for f in files))
        return model_dir
    for path, size, sha in files:
        blob = root / "blobs" / sha
        if blob.exists() and blob.stat().st_size == size:
            if progress:
                progress(size)
            continue
        blobs.fetch_to_file(ctx, sha, size, blob, progress=progress, what=f"base model {name}: {path}")
    (root / "models").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root / "models", prefix=f".{digest}-"))
    try:
        for path, _size, sha in files:
            target = tmp / path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / "blobs" / sha, target)
            except OSError:
                shutil.copyfile(root / "blobs" / sha, target)
        (tmp / ".complete").write_text(name)
        try:
            os.replace(tmp, model_dir)
        except OSError:
            if not (model_dir / ".complete").exists():  # another worker won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


__all__ = [
    "check_base_name",
    "files_of",
    "finish_blob",
    "get",
    "list_base_models",
    "materialise",
    "register",
    "register_manifest",
    "remove",
    "scan_dir",
    "store_blob",
    "usage",
    "usage_for",
]
