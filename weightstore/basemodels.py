"""Registered base models: Hugging Face layouts stored in the same content-addressed blob store.

A base model is a name plus a manifest (``base_model_file``: relative path → blob sha256), exactly
like a checkpoint. Registration goes through the same write order as an upload (rule S2): object
durable at ``blob_key(sha)`` with its sha256 checked by the store → blob row ``live`` → manifest
committed, in one transaction that re-checks the blobs. Content already stored (a second name for
the same weights, a shared tokenizer) moves zero bytes.

Export workers *materialise* a base model into a local cache keyed by sha256 (one file per blob,
written to a temp name and renamed only after its sha256 matched), so a model used by many jobs
is downloaded once per machine, and a corrupted object in the store fails the job loudly instead of
producing a silently wrong merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from weightstore import audit, uploads
from weightstore.auth import Principal
from weightstore.checkpoints import visible_clause
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import (
    AlreadyExists,
    CatalogBusy,
    DataLoss,
    InUse,
    InvalidName,
    InvalidRequest,
    NotFound,
    UploadIncomplete,
)
from weightstore.hashing import sha256_file
from weightstore.models import BaseModel, BaseModelFile, Blob, BlobState, Checkpoint, ExportJob, TrainingRun
from weightstore.names import check_file_path, check_sha256
from weightstore.objectstore import blob_key
from weightstore.uploads import BlobWriter

Progress = Callable[[int], None]
CHUNK = 8 * 1024 * 1024
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
ACTIVE_JOB_STATES = ("queued", "running")


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


@dataclass(frozen=True)
class LocalFile:
    path: str
    """Relative path inside the model directory."""
    local: Path
    size_bytes: int
    sha256: str


def scan_dir(directory: Path) -> list[LocalFile]:
    """The model files of a Hugging Face layout directory, hashed. Refuses a directory that is not
    a safetensors model (no config.json, no shards, an index naming a missing shard)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidRequest(f"{directory} is not a directory")
    out: list[LocalFile] = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or rel.startswith(".") or "/." in rel or not _INCLUDE.match(p.name):
            continue
        check_file_path(rel)
        out.append(LocalFile(rel, p, p.stat().st_size, sha256_file(p)))
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


def _put_blob(ctx: Context, f: LocalFile, progress: Progress | None) -> int:
    """Store one file at its content address unless a live blob already holds it. Returns bytes sent."""
    with session_scope(ctx.engine) as session:
        blob = session.get(Blob, f.sha256)
        if blob is not None and blob.state == BlobState.deleting:
            raise CatalogBusy(f"{f.path}: these bytes are being garbage-collected right now; retry in a minute")
        live = blob is not None and blob.state == BlobState.live
    if live and ctx.store.head(blob_key(f.sha256)) is not None:
        if progress:
            progress(f.size_bytes)
        return 0
    s = ctx.settings
    # BlobWriter: the object only appears at its key once size and sha256 matched (the file may
    # have changed since it was hashed).
    writer = BlobWriter(
        ctx.store,
        sha256=f.sha256,
        size=f.size_bytes,
        exists=False,
        part_size=s.part_size_bytes,
        threshold=s.multipart_threshold_bytes,
    )
    try:
        with open(f.local, "rb") as fh:
            while data := fh.read(CHUNK):
                writer.write(data)
                if progress:
                    progress(len(data))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return f.size_bytes


def register(
    ctx: Context,
    principal: Principal,
    name: str,
    directory: str | Path,
    *,
    progress: Progress | None = None,
    request_id: str | None = None,
) -> BaseModel:
    """Upload a local Hugging Face directory as base model ``name`` (admin only; in-process use)."""
    principal.require_admin()
    check_base_name(name)
    directory = Path(directory)
    with session_scope(ctx.engine) as session:
        if session.get(BaseModel, name) is not None:
            raise AlreadyExists(f"base model {name!r} is already registered (remove it first)")
    files = scan_dir(directory)
    config = _read_config(directory)
    sent = sum(_put_blob(ctx, f, progress) for f in files)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        for f in files:
            uploads.mark_live(session, f.sha256, f.size_bytes, now)
        session.flush()
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


def store_blob(ctx: Context, principal: Principal, sha256: str, size: int) -> BlobWriter | None:
    """Start receiving one base-model file through the service (admin only). ``None``: a live blob
    already holds these bytes and nothing needs to move."""
    principal.require_admin()
    with session_scope(ctx.engine) as session:
        blob = session.get(Blob, sha256)
        if blob is not None and blob.state == BlobState.deleting:
            raise CatalogBusy("these bytes are being garbage-collected right now; retry in a minute")
        if blob is not None and blob.state == BlobState.live:
            blob.last_referenced_at = ctx.clock.now()
            session.add(blob)
            return None
    s = ctx.settings
    return BlobWriter(
        ctx.store, sha256=sha256, size=size, exists=False, part_size=s.part_size_bytes, threshold=s.multipart_threshold_bytes
    )


def finish_blob(ctx: Context, writer: BlobWriter) -> None:
    """Verify and publish a blob received by ``store_blob``, then mark it live (write order S2)."""
    writer.finish()
    with session_scope(ctx.engine) as session:
        uploads.mark_live(session, writer.sha256, writer.size, ctx.clock.now())


def register_manifest(
    ctx: Context, principal: Principal, name: str, files: list[tuple[str, int, str]], *, request_id: str | None = None
) -> BaseModel:
    """Register a manifest (path, size, sha256) whose blobs were sent with ``store_blob``. Files not
    yet live are named in an ``UploadIncomplete`` error (``details.missing``: their sha256s)."""
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
        missing = []
        for _path, size, sha in files:
            blob = session.get(Blob, sha)
            if blob is None or blob.state != BlobState.live or blob.size_bytes != size:
                missing.append(sha)
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
        for _path, _size, sha in files:
            blob = session.get(Blob, sha)
            if blob is None or blob.state != BlobState.live:  # collected meanwhile: send again
                raise UploadIncomplete("a file was garbage-collected meanwhile; send it again", missing=[sha])
        return _commit_manifest(session, principal, name, files, config, now=now, request_id=request_id)


def _commit_manifest(
    session: Session,
    principal: Principal,
    name: str,
    files: list[tuple[str, int, str]],
    config: dict[str, Any],
    *,
    now: Any,
    request_id: str | None = None,
    **details: Any,
) -> BaseModel:
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
    shas = sorted({f[2] for f in files})
    session.execute(sa.update(Blob).where(Blob.sha256.in_(shas)).values(last_referenced_at=now))  # type: ignore[attr-defined]
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
    return list(session.exec(select(BaseModel).order_by(BaseModel.name)).all())  # type: ignore[arg-type]


def get(session: Session, name: str) -> BaseModel:
    row = session.get(BaseModel, name)
    if row is None:
        known = [b.name for b in list_base_models(session)]
        raise NotFound(f"base model {name!r} is not registered (registered: {', '.join(known) or 'none'})")
    return row


def files_of(session: Session, name: str) -> list[BaseModelFile]:
    return list(session.exec(select(BaseModelFile).where(BaseModelFile.base_model == name).order_by(BaseModelFile.path)).all())  # type: ignore[arg-type]


def usage(session: Session, name: str, *, now: Any) -> dict[str, int]:
    """What still uses a base model: visible checkpoints of runs trained on it, and unfinished jobs."""
    ckpts = session.exec(
        select(sa.func.count())
        .select_from(Checkpoint)
        .join(TrainingRun, TrainingRun.id == Checkpoint.run_id)
        .where(  # type: ignore[arg-type]
            TrainingRun.base_model == name, visible_clause(now)
        )
    ).one()
    jobs = session.exec(
        select(sa.func.count()).select_from(ExportJob).where(ExportJob.base_model == name, ExportJob.state.in_(ACTIVE_JOB_STATES))
    ).one()  # type: ignore[attr-defined]
    return {"checkpoints": int(ckpts), "active_jobs": int(jobs)}


def remove(session: Session, principal: Principal, name: str, *, now: Any, request_id: str | None = None) -> None:
    """Unregister a base model. Refused (``InUse``) while checkpoints of runs on it are visible or
    jobs that use it are unfinished. The blobs become garbage after the collector's grace period."""
    principal.require_admin()
    get(session, name)
    used = usage(session, name, now=now)
    if used["checkpoints"] or used["active_jobs"]:
        raise InUse(
            f"base model {name!r} is still used by {used['checkpoints']} checkpoint(s) and "
            f"{used['active_jobs']} unfinished export job(s)",
            **used,
        )
    shas = sa.select(BaseModelFile.sha256).where(BaseModelFile.base_model == name)  # type: ignore[call-overload]
    session.execute(sa.update(Blob).where(Blob.sha256.in_(shas)).values(last_referenced_at=now))  # type: ignore[attr-defined]
    session.execute(sa.delete(BaseModelFile).where(BaseModelFile.base_model == name))  # type: ignore[arg-type]
    session.execute(sa.delete(BaseModel).where(BaseModel.name == name))  # type: ignore[arg-type]
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


def fetch_blob(ctx: Context, sha256: str, size: int, dest: Path, *, progress: Progress | None = None, what: str = "") -> None:
    """Download one blob to ``dest`` (atomic: temp file, then rename), verifying size and sha256.
    A mismatch is ``DataLoss``: the store holds bytes that differ from what was verified at commit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            for data in ctx.store.iter_chunks(blob_key(sha256)):
                out.write(data)
                h.update(data)
                n += len(data)
                if progress:
                    progress(len(data))
        if n != size or h.hexdigest() != sha256:
            raise DataLoss(
                f"{what or sha256}: the stored object is corrupt (expected sha256 {sha256} and "
                f"{size} bytes, got {h.hexdigest()} and {n} bytes)",
                sha256=sha256,
                file=what,
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def materialise(ctx: Context, name: str, *, root: Path | None = None, progress: Progress | None = None) -> Path:
    """A local directory holding base model ``name``, every file's sha256 verified.

    Blobs are cached as ``root/blobs/<sha>`` (reused by every model and job on this machine); the
    model directory is ``root/models/<manifest digest>/`` with hard links (copies across devices)
    to them, built in a temp dir and renamed into place, so a half-built directory is never seen.
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
        fetch_blob(ctx, sha, size, blob, progress=progress, what=f"base model {name}: {path}")
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
    "fetch_blob",
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
]
