"""Publishing a checkpoint: the manifest commit over live blobs, and "publish local files as a checkpoint".

The last step of the write order (docs/design.md, rule S2) lives here, once: in one transaction,
re-read every referenced blob under the collector's row locks (``blobs.lock_live``), refuse any that
is not ``live``, then write the checkpoint row, its manifest, the tenant's proof of holding each
blob (``tenant_blob``, for later dedup, S4), the ledger ``commit`` and the audit row. One committed
checkpoint per (run, kind, name) is decided by the database's partial unique index (S5).

Two callers commit this way:
- the upload protocol (``uploads.commit``), for bytes a trainer sent;
- ``publish_files`` (a workflow), for files already on this machine (an export job's output):
  verified blob writes (``blobs.store_file``), then the one manifest transaction, which the caller
  can *fence* (an export job checks there that it still owns its lease).

``add_checkpoint`` is also where a new checkpoint is held to its tenant's hard quota and to its
run's existence (issue 12, parts 2 and 5), under the run's and the tenant's row locks
(``runs.lock_for_write``, ``tenants.check_quota(lock=True)``): an export's output and any other
caller are checked there; an upload commit passes ``reserved=True`` because its declare already
reserved the bytes under the same tenant lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from weightstore import audit, blobs, checkpoints, formats, retention, runs, tenants
from weightstore.auth import Principal
from weightstore.billing import ledger
from weightstore.checkpoints import end_checkpoint
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import AlreadyExists, CatalogBusy, InvalidRequest
from weightstore.hashing import sha256_file
from weightstore.models import Blob, Checkpoint, CheckpointFile, CheckpointState, TenantBlob
from weightstore.names import TinkerPath, check_file_path, check_name, check_sha256, new_id
from weightstore.retention import check_ttl, expires_at_for
from weightstore.settings import Settings

ManifestEntry = tuple[str, int, str]
"""One manifest file: (path, size in bytes, sha256)."""
Fence = Callable[[Session, Checkpoint], None]
"""Runs inside the manifest transaction, after the checkpoint row exists; raising rolls it all back."""


@dataclass(frozen=True)
class NewCheckpoint:
    """What a checkpoint about to be committed is called and how long it lives."""

    run_id: str
    kind: str
    name: str
    ttl_seconds: int | None = None
    """None: no expiry (``publish_files`` first replaces None with the tenant's default for the kind)."""
    user_metadata: dict[str, str] | None = None
    overwrite: bool = False
    """Replace a committed checkpoint of the same (run, kind, name) instead of ``AlreadyExists``."""
    exported_from_id: str | None = None
    """The source checkpoint, for an export's output."""

    @property
    def tinker_path(self) -> TinkerPath:
        return TinkerPath(self.run_id, self.kind, self.name)


# --- checks that need no bytes ------------------------------------------------------------------


check_user_metadata = formats.check_user_metadata  # the one rule for every route (issue 11, item 5)


def check_files(
    settings: Settings, kind: str, files: Sequence[ManifestEntry], *, layout: str | None = None, complete: bool = True
) -> None:
    """Paths, sizes, sha256s, the file count and the file set a kind requires (``formats.check_file_set``;
    ``complete=False``: a DCP upload whose ranks have not all added their files yet, maybe none)."""
    if not files and complete:
        raise InvalidRequest("a checkpoint needs at least one file")
    if len(files) > settings.max_files_per_checkpoint:
        raise InvalidRequest(f"at most {settings.max_files_per_checkpoint} files per checkpoint")
    for path, size, sha in files:
        check_file_path(path)
        check_sha256(sha)
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= settings.max_file_bytes:
            raise InvalidRequest(f"{path}: size must be 0..{settings.max_file_bytes} bytes")
    formats.check_file_set(kind, [path for path, _, _ in files], layout=layout, complete=complete)


# --- catalog functions --------------------------------------------------------------------------


def existing_committed(session: Session, path: TinkerPath) -> Checkpoint | None:
    """The committed checkpoint holding ``path``'s name, if any (expired ones no longer do)."""
    return session.exec(
        select(Checkpoint).where(
            Checkpoint.run_id == path.run_id,
            Checkpoint.kind == path.kind,
            Checkpoint.name == path.name,
            Checkpoint.state == CheckpointState.committed,
        )
    ).first()


def add_manifest(
    session: Session, ckpt: Checkpoint, files: Sequence[ManifestEntry], live: Mapping[str, Blob], *, now: datetime
) -> None:
    """Write a new checkpoint's manifest: one row per file, the tenant's proof of holding each
    blob (for later dedup), and a touch on every blob. ``live`` must be the caller's
    ``blobs.lock_live`` rows for every sha256 in ``files``."""
    for path, size, sha in files:
        session.add(CheckpointFile(checkpoint_id=ckpt.id, path=path, size_bytes=size, sha256=sha))
    shas = sorted({sha for _, _, sha in files})
    owned = set(
        session.exec(
            select(TenantBlob.sha256).where(TenantBlob.tenant_id == ckpt.tenant_id, col(TenantBlob.sha256).in_(shas))
        ).all()
    )
    for sha in shas:
        if sha not in owned:
            session.add(TenantBlob(tenant_id=ckpt.tenant_id, sha256=sha, created_at=now))
        live[sha].last_referenced_at = now
        session.add(live[sha])


def add_checkpoint(
    session: Session,
    tenant_id: str,
    new: NewCheckpoint,
    files: Sequence[ManifestEntry],
    live: Mapping[str, Blob],
    *,
    now: datetime,
    reserved: bool = False,
) -> Checkpoint:
    """Commit ``new`` over blobs the caller locked with ``blobs.lock_live`` (all live): the
    checkpoint row (ending the one it overwrites), its manifest, the run's touch and the ledger
    ``commit``. ``AlreadyExists`` when the name is taken and ``overwrite`` is false. The caller
    adds its audit row and maps a unique-index violation on flush to ``AlreadyExists`` (S5).

    The run is locked first (``RunDeleted`` once ``runs rm`` deleted it); then, unless ``reserved``
    (an upload's declare already counted these bytes), the tenant's hard quota is checked under the
    tenant's row lock, crediting the checkpoint an overwrite replaces (``TenantQuotaExceeded``)."""
    run = runs.lock_for_write(session, tenant_id, new.run_id)
    old = existing_committed(session, new.tinker_path)
    if old is not None and not new.overwrite:
        raise AlreadyExists(f"{new.tinker_path} already exists")
    size = sum(size for _, size, _ in files)
    if not reserved:
        tenants.check_quota(session, tenant_id, size, now=now, replaced=_replaced_bytes(old, tenant_id, now), lock=True)
    if old is not None:
        end_checkpoint(session, old, state=CheckpointState.deleted, at=now, now=now)
        session.flush()
    ckpt = Checkpoint(
        id=new_id("ckpt"),
        tenant_id=tenant_id,
        run_id=new.run_id,
        kind=new.kind,
        name=new.name,
        size_bytes=size,
        created_at=now,
        expires_at=expires_at_for(now, new.ttl_seconds),
        user_metadata=new.user_metadata,
        exported_from_id=new.exported_from_id,
    )
    session.add(ckpt)
    session.flush()
    add_manifest(session, ckpt, files, live, now=now)
    runs.touch(session, run, now)
    ledger.on_commit(session, ckpt, now=now)
    return ckpt


def _replaced_bytes(old: Checkpoint | None, tenant_id: str, now: datetime) -> int:
    """What an overwrite of ``old`` gives back to the quota (a visible checkpoint of the tenant's)."""
    return old.size_bytes if old is not None and old.tenant_id == tenant_id and checkpoints.is_visible(old, now) else 0


# --- publish local files (workflow) -------------------------------------------------------------


def local_files(directory: Path) -> list[blobs.LocalFile]:
    """Every file under ``directory`` (sorted), hashed, with its path relative to it."""
    return [
        blobs.LocalFile(p.relative_to(directory).as_posix(), p, p.stat().st_size, sha256_file(p))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    ]


def _validate_local(settings: Settings, f: blobs.LocalFile) -> None:
    """The format checks an upload commit runs, from the local file's header (no store reads)."""
    with open(f.local, "rb") as fh:

        def read_range(start: int, n: int) -> bytes:
            fh.seek(start)
            return fh.read(n)

        formats.validate_file(
            f.path,
            f.size_bytes,
            read_range,
            max_header=settings.max_safetensors_header_bytes,
            max_json=settings.max_json_file_bytes,
        )


def publish_files(
    ctx: Context,
    actor: Principal,
    new: NewCheckpoint,
    files: Sequence[blobs.LocalFile],
    *,
    fence: Fence | None = None,
    progress: blobs.Progress | None = None,
    audit_details: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Publish local files as checkpoint ``new`` of ``actor``'s tenant. Workflow: validate (name,
    TTL, metadata, files, formats, name not taken), write every file as a verified blob, then one
    manifest transaction in which ``fence`` runs too: if it raises, nothing is committed.
    ``CatalogBusy`` (retryable) if the collector took one of the blobs meanwhile."""
    s = ctx.settings
    check_name(new.name, max_length=s.name_max_length)
    check_ttl(s, new.ttl_seconds)
    check_user_metadata(new.user_metadata)
    entries = [(f.path, f.size_bytes, f.sha256) for f in files]
    check_files(s, new.kind, entries)
    for f in files:
        _validate_local(s, f)
    with session_scope(ctx.engine) as session:
        runs.lock_for_write(session, actor.tenant_id, new.run_id)  # early: before any byte moves
        old = existing_committed(session, new.tinker_path)
        if not new.overwrite and old is not None:
            raise AlreadyExists(f"{new.tinker_path} already exists")
        size = sum(f.size_bytes for f in files)
        now = ctx.clock.now()  # early, unlocked; add_checkpoint checks again under the tenant lock
        replaced = _replaced_bytes(old, actor.tenant_id, now)
        tenants.check_quota(session, actor.tenant_id, size, now=now, replaced=replaced, lock=False)
        if new.ttl_seconds is None:
            new = replace(new, ttl_seconds=retention.tenant_default_ttl(session, actor.tenant_id, new.kind))
    for f in files:
        blobs.store_file(ctx, f, progress=progress)
    now = ctx.clock.now()
    try:
        with session_scope(ctx.engine) as session:
            runs.lock_for_write(session, actor.tenant_id, new.run_id)  # lock order: run, then blobs, then tenant
            live, not_live = blobs.lock_live(session, [sha for _, _, sha in entries])
            if not_live:
                raise CatalogBusy(f"{len(not_live)} file(s) were garbage-collected while being published; retry")
            ckpt = add_checkpoint(session, actor.tenant_id, new, entries, live, now=now)
            if fence is not None:
                fence(session, ckpt)
            audit.record(
                session,
                at=now,
                action="checkpoint.commit",
                tenant_id=actor.tenant_id,
                key_id=actor.key_id,
                target=str(new.tinker_path),
                size_bytes=ckpt.size_bytes,
                **dict(audit_details or {}),
            )
            session.flush()
    except DBIntegrityError as exc:  # a concurrent commit took the name (S5)
        raise AlreadyExists(f"{new.tinker_path} already exists") from exc
    return ckpt


__all__ = [
    "Fence",
    "ManifestEntry",
    "NewCheckpoint",
    "add_checkpoint",
    "add_manifest",
    "check_files",
    "check_user_metadata",
    "existing_committed",
    "local_files",
    "publish_files",
]
