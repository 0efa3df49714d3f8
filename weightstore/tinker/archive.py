"""The legacy archive of the Tinker SDK ≤ 0.35: one tar of a checkpoint's adapter files.

A deterministic, uncompressed tar of the adapter files plus ``checkpoint_complete`` at its root,
stored as a content-addressed blob that nothing references (the collector reclaims it after the
grace period) and handed out as a presigned GET.

Built once per checkpoint: ``archive_cache`` records which blob holds a checkpoint's archive (keyed
by checkpoint id, checked against a digest of the archived manifest). While that blob is ``live``
and present, a request only touches it (restarting its grace period) and signs a URL: no checkpoint
byte is read again, whoever asks (any reader of a published checkpoint may).

The archive blob is deliberately not a reference (``weightstore.blobs.refs``): it is derived data,
rebuildable from the checkpoint's own blobs, and counting it would keep a second copy of every
archived adapter for as long as the checkpoint lives. The collector's ``archives`` phase removes the
rows that can never be served again (``prune_cache``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col

from weightstore import audit, blobs, checkpoints
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import NotFound, Unsupported
from weightstore.formats import OPTIMIZER_STATE
from weightstore.hashing import sha256_file
from weightstore.models import ArchiveCache, Blob, BlobState, Checkpoint
from weightstore.names import TinkerPath
from weightstore.objectstore import blob_key

ARCHIVE_MARKER = "checkpoint_complete"
"""An empty file at the tar's root: old SDKs take its presence as "the download is complete"."""


@dataclass(frozen=True)
class ArchiveUrl:
    url: str
    expires_at: datetime
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ArchiveMember:
    name: str
    sha256: str
    size_bytes: int


def archive_members(session: Session, principal: Principal, path: TinkerPath, *, now: datetime) -> list[ArchiveMember]:
    """The files the archive holds (everything but the optimizer state), sorted by name. Catalog
    function; ``NotFound`` while the collector reclaims any of them."""
    return _source(session, principal, path, now=now)[1]


def _source(session: Session, principal: Principal, path: TinkerPath, *, now: datetime) -> tuple[Checkpoint, list[ArchiveMember]]:
    ckpt = checkpoints.get_for(session, principal, path, now=now, allow_public=True)
    if ckpt.kind == "merged":
        raise Unsupported("archives are built for LoRA checkpoints only; use the native file URLs")
    members = [
        ArchiveMember(f.path, f.sha256, f.size_bytes) for f in checkpoints.files_of(session, ckpt) if f.path != OPTIMIZER_STATE
    ]
    for member in members:
        blob = session.get(Blob, member.sha256)
        if blob is None or blob.state != BlobState.live:
            raise NotFound(f"checkpoint {path} is being collected")
    return ckpt, sorted(members, key=lambda m: m.name)


def manifest_digest(members: list[ArchiveMember]) -> str:
    """What the archive's bytes are a function of (with the fixed tar layout): names, sha256s, sizes."""
    return hashlib.sha256(json.dumps([[m.name, m.sha256, m.size_bytes] for m in members]).encode()).hexdigest()


def _cached(session: Session, ckpt_id: str, digest: str, now: datetime) -> ArchiveCache | None:
    """The recorded archive of this checkpoint if its blob is still live (touched: its grace period
    restarts, so the collector leaves it alone while it is being handed out). Catalog function."""
    row = session.get(ArchiveCache, ckpt_id)
    if row is None or row.manifest_digest != digest:
        return None
    blob = session.get(Blob, row.sha256)
    if blob is None or blob.state != BlobState.live:
        return None
    blob.last_referenced_at = now
    session.add(blob)
    return row


def _remember(session: Session, ckpt_id: str, digest: str, sha: str, size: int, now: datetime) -> None:
    """Record the archive, replacing any earlier row: a delete and an insert, never an ORM update, so
    a row the collector pruned meanwhile (``prune_cache``) cannot turn into a stale-update error; two
    first requests racing meet on the primary key (the caller ignores that ``IntegrityError``)."""
    session.execute(sa.delete(ArchiveCache).where(col(ArchiveCache.checkpoint_id) == ckpt_id))
    session.add(ArchiveCache(checkpoint_id=ckpt_id, manifest_digest=digest, sha256=sha, size_bytes=size, created_at=now))
    session.flush()


# --- pruning (the collector's ``archives`` phase; issue 11 residue) --------------------------------
def stale_cache_clause(now: datetime) -> sa.ColumnElement[bool]:
    """An ``archive_cache`` row that can never be handed out again: its checkpoint is gone or no longer
    visible (deleted, expired, in the trash), or its blob is not ``live`` (collected, being deleted).

    Such a row is only a pointer: deleting it never deletes bytes. A URL already handed out names the
    blob, not the row, and the blob's grace period (restarted by every hand-out, ``_cached``) keeps it
    until that URL has expired. A restored checkpoint simply rebuilds its archive. A row whose
    checkpoint is visible and whose blob is live is kept: that is the cache entry being served."""
    visible = sa.exists().where(col(Checkpoint.id) == col(ArchiveCache.checkpoint_id), checkpoints.visible_clause(now))
    live = sa.exists().where(col(Blob.sha256) == col(ArchiveCache.sha256), col(Blob.state) == BlobState.live.value)
    return sa.or_(~visible, ~live)


def stale_cache_rows(session: Session, *, now: datetime) -> tuple[int, int]:
    """(rows, archive bytes) that ``prune_cache`` would remove now. Catalog function."""
    n, nbytes = session.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(col(ArchiveCache.size_bytes)), 0)).where(stale_cache_clause(now))
    ).one()
    return int(n), int(nbytes)


def prune_cache(session: Session, *, now: datetime, limit: int) -> int:
    """Delete up to ``limit`` stale rows (``stale_cache_clause``, re-evaluated by the DELETE itself, so
    a row that became valid again since a plan is kept). Returns how many went. Catalog function."""
    pick = sa.select(col(ArchiveCache.checkpoint_id)).where(stale_cache_clause(now)).limit(limit)
    result = session.execute(
        sa.delete(ArchiveCache).where(col(ArchiveCache.checkpoint_id).in_(pick.scalar_subquery()), stale_cache_clause(now))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result


def _write_tar(ctx: Context, members: list[ArchiveMember], dest: Path) -> None:
    """Deterministic: sorted members, mtime 0, mode 0644, so one checkpoint always gives one sha256."""
    with tarfile.open(dest, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = member.size_bytes, 0, 0o644
            tar.addfile(info, _ChunkReader(ctx.store.iter_chunks(blob_key(member.sha256))))
        marker = tarfile.TarInfo(ARCHIVE_MARKER)
        marker.mtime, marker.mode = 0, 0o644
        tar.addfile(marker, io.BytesIO(b""))


def archive_url(ctx: Context, principal: Principal, path: TinkerPath) -> ArchiveUrl:
    """Build (once per checkpoint) the archive, store it as a verified blob and hand out a presigned
    GET. Later requests reuse the recorded blob while it is live: one HEAD, no read of the
    checkpoint's files (module doc). Workflow."""
    with session_scope(ctx.engine) as session:
        ckpt, members = _source(session, principal, path, now=ctx.clock.now())
        digest = manifest_digest(members)
        hit = _cached(session, ckpt.id, digest, ctx.clock.now())
        cached = (hit.sha256, hit.size_bytes) if hit is not None else None
    if cached is not None and ctx.store.head(blob_key(cached[0])) is not None:
        sha, size = cached
    else:
        with tempfile.TemporaryDirectory(prefix="weightstore-archive-") as tmp:
            local = Path(tmp) / "archive.tar"
            _write_tar(ctx, members, local)
            sha, size = sha256_file(local), local.stat().st_size
            blobs.store_file(ctx, blobs.LocalFile("archive.tar", local, size, sha))
        # suppress: a concurrent first request recorded the same archive
        with contextlib.suppress(DBIntegrityError), session_scope(ctx.engine) as session:
            _remember(session, ckpt.id, digest, sha, size, ctx.clock.now())
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        audit.record(
            session, at=now, action="checkpoint.archive", tenant_id=principal.tenant_id, key_id=principal.key_id, target=str(path)
        )
    ttl = ctx.settings.presign_ttl_seconds
    url = ctx.store.presign_get(blob_key(sha), ttl, filename="archive.tar")
    return ArchiveUrl(url, now + timedelta(seconds=ttl), sha, size)


class _ChunkReader(io.RawIOBase):
    """A file-like view of an object's chunks (``tarfile`` pulls exactly ``size`` bytes)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
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
