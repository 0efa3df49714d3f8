"""The legacy archive of the Tinker SDK ≤ 0.35: one tar of a checkpoint's adapter files.

A deterministic, uncompressed tar of the adapter files plus ``checkpoint_complete`` at its root,
stored as a content-addressed blob that nothing references (the collector reclaims it after the
grace period) and handed out as a presigned GET."""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlmodel import Session

from weightstore import audit, blobs, checkpoints
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import NotFound, Unsupported
from weightstore.formats import OPTIMIZER_STATE
from weightstore.hashing import sha256_file
from weightstore.models import Blob, BlobState
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
    return sorted(members, key=lambda m: m.name)


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
    """Build (once per content) the archive, store it as a verified blob and hand out a presigned
    GET. A second request for the same checkpoint reuses the stored blob. Workflow."""
    with session_scope(ctx.engine) as session:
        members = archive_members(session, principal, path, now=ctx.clock.now())
    with tempfile.TemporaryDirectory(prefix="weightstore-archive-") as tmp:
        local = Path(tmp) / "archive.tar"
        _write_tar(ctx, members, local)
        sha, size = sha256_file(local), local.stat().st_size
        blobs.store_file(ctx, blobs.LocalFile("archive.tar", local, size, sha))
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
