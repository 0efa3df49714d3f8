"""Checkpoints once committed: look-up, listing, delete, TTL change, expiry, download URLs.

Visibility rule (one place): a checkpoint is visible when it is ``committed`` and not past its
``expires_at`` (or ``pinned``). An expired checkpoint disappears at once, before the collector confirms it.

Pinned checkpoints (``weightstore.policies``) are never expired by TTL or policy: ``expire_due``
skips them, pinning clears ``expires_at`` and ``set_ttl`` refuses them until they are unpinned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col, select

from weightstore import audit, formats
from weightstore.auth import Principal
from weightstore.billing import ledger
from weightstore.blobs import chunks as blob_chunks
from weightstore.errors import InvalidRequest, NotFound
from weightstore.models import Blob, Checkpoint, CheckpointFile, CheckpointState
from weightstore.names import TinkerPath
from weightstore.objectstore import ObjectStore, blob_key
from weightstore.retention import check_ttl, expires_at_for
from weightstore.settings import Settings


def visible_clause(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        col(Checkpoint.state) == CheckpointState.committed,
        sa.or_(col(Checkpoint.expires_at).is_(None), col(Checkpoint.expires_at) > now, col(Checkpoint.pinned)),
    )


def is_visible(ckpt: Checkpoint, now: datetime) -> bool:
    return ckpt.state == CheckpointState.committed and (ckpt.expires_at is None or ckpt.expires_at > now or ckpt.pinned)


def tinker_path(ckpt: Checkpoint) -> str:
    return str(TinkerPath(ckpt.run_id, ckpt.kind, ckpt.name))


def find(
    session: Session, path: TinkerPath, *, now: datetime, tenant_id: str | None = None, allow_public: bool = False
) -> Checkpoint:
    """The visible checkpoint at ``path`` owned by ``tenant_id`` (or public, if allowed)."""
    q = select(Checkpoint).where(
        Checkpoint.run_id == path.run_id, Checkpoint.kind == path.kind, Checkpoint.name == path.name, visible_clause(now)
    )
    ckpt = session.exec(q).first()
    if ckpt is None or (tenant_id is not None and ckpt.tenant_id != tenant_id and not (allow_public and ckpt.public)):
        raise NotFound(f"checkpoint {path} not found")
    return ckpt


def get_for(session: Session, principal: Principal, path: TinkerPath, *, now: datetime, allow_public: bool = False) -> Checkpoint:
    return find(session, path, now=now, tenant_id=principal.tenant_id, allow_public=allow_public)


def list_checkpoints(
    session: Session,
    principal: Principal,
    *,
    now: datetime,
    run_id: str | None = None,
    kind: str | None = None,
    limit: int | None = 100,
    offset: int = 0,
) -> tuple[list[Checkpoint], int]:
    """Newest first. Returns (page, total)."""
    q = select(Checkpoint).where(Checkpoint.tenant_id == principal.tenant_id, visible_clause(now))
    if run_id is not None:
        q = q.where(Checkpoint.run_id == run_id)
    if kind is not None:
        q = q.where(Checkpoint.kind == kind)
    total = session.exec(select(sa.func.count()).select_from(q.subquery())).one()
    q = q.order_by(col(Checkpoint.created_at).desc(), col(Checkpoint.id).desc()).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.exec(q).all()), int(total)


def files_of(session: Session, ckpt: Checkpoint) -> list[CheckpointFile]:
    return list(
        session.exec(select(CheckpointFile).where(CheckpointFile.checkpoint_id == ckpt.id).order_by(CheckpointFile.path)).all()
    )


def layouts(session: OrmSession, rows: Sequence[Checkpoint]) -> dict[str, str]:
    """Each checkpoint's layout by id (``formats.checkpoint_layout``), in one indexed query for any
    number of rows (the layout is recognised from file names: no catalog column)."""
    ids = [c.id for c in rows if c.kind not in formats.KIND_LAYOUTS]
    dcp: set[str] = set()
    if ids:
        dcp = set(
            session.execute(
                sa.select(col(CheckpointFile.checkpoint_id)).where(
                    col(CheckpointFile.checkpoint_id).in_(ids), col(CheckpointFile.path) == formats.DCP_METADATA
                )
            ).scalars()
        )
    return {c.id: formats.checkpoint_layout(c.kind, [formats.DCP_METADATA] if c.id in dcp else []) for c in rows}


def end_checkpoint(session: Session, ckpt: Checkpoint, *, state: CheckpointState, at: datetime, now: datetime) -> None:
    """Take a checkpoint out of the live set: state change, ledger ``end`` and a touch on its
    blobs (so the collector's grace period counts from now, not from their last commit)."""
    ckpt.state = state
    ckpt.deleted_at = now if state == CheckpointState.deleted else ckpt.deleted_at
    session.add(ckpt)
    ledger.on_end(session, ckpt, at=at, now=now)
    shas = sa.select(col(CheckpointFile.sha256)).where(col(CheckpointFile.checkpoint_id) == ckpt.id)
    session.execute(sa.update(Blob).where(col(Blob.sha256).in_(shas)).values(last_referenced_at=now))


def expire_due(session: Session, *, now: datetime, limit: int, ids: Sequence[str] | None = None) -> list[str]:
    """Set-based ``end_checkpoint(state=expired, at=expires_at)`` for up to ``limit`` committed,
    unpinned checkpoints whose ``expires_at`` has passed (only among ``ids`` when given: the
    retention-policy path sets ``expires_at = now`` on its picks, then expires them here, so policy
    and TTL expiry are one path); returns their ids.

    Three statements, whatever the count: UPDATE ... RETURNING (the state change; on PostgreSQL
    it also row-locks exactly the checkpoints it changed), one INSERT ... SELECT of ledger ``end``
    rows stamped at each ``expires_at``, and one UPDATE touching their blobs. The touch moves
    ``last_referenced_at`` to ``expires_at`` — never backwards: a blob whose last reference ended
    later (another checkpoint deleted since, an upload closed since) keeps its later time. So the
    blob grace and the restore window are one window counted from ``expires_at``.
    """
    due = sa.and_(
        col(Checkpoint.state) == CheckpointState.committed.value,
        col(Checkpoint.expires_at) <= now,
        sa.not_(col(Checkpoint.pinned)),
    )
    if ids is not None:
        due = sa.and_(due, col(Checkpoint.id).in_(list(ids)))
    pick = sa.select(col(Checkpoint.id)).where(due).order_by(col(Checkpoint.id)).limit(limit)
    done = [
        r[0]
        for r in session.execute(
            sa.update(Checkpoint)
            .where(col(Checkpoint.id).in_(pick.scalar_subquery()), due)
            .values(state=CheckpointState.expired.value)
            .returning(col(Checkpoint.id))
        ).all()
    ]
    if not done:
        return done
    ledger.on_end_expired(session, done, now=now)
    # One UPDATE ... FROM a grouped derived table (each blob's latest expires_at among these
    # checkpoints); a correlated subquery per blob row was measured 23 s for 2,000 on PostgreSQL.
    latest = (
        sa.select(col(CheckpointFile.sha256).label("sha256"), sa.func.max(Checkpoint.expires_at).label("at"))
        .join(Checkpoint, col(Checkpoint.id) == col(CheckpointFile.checkpoint_id))
        .where(col(Checkpoint.id).in_(done))
        .group_by(col(CheckpointFile.sha256))
        .subquery()
    )
    session.execute(
        sa.update(Blob)
        .where(col(Blob.sha256) == latest.c.sha256, col(Blob.last_referenced_at) < latest.c.at)
        .values(last_referenced_at=latest.c.at)
    )
    return done


def delete(
    session: Session, principal: Principal, path: TinkerPath, *, now: datetime, request_id: str | None = None
) -> Checkpoint:
    """Mark deleted: invisible at once; the collector reclaims the bytes after the grace period."""
    principal.require_write()
    ckpt = get_for(session, principal, path, now=now)
    end_checkpoint(session, ckpt, state=CheckpointState.deleted, at=now, now=now)
    audit.record(
        session,
        at=now,
        action="checkpoint.delete",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=str(path),
        request_id=request_id,
    )
    return ckpt


def set_ttl(
    session: Session,
    principal: Principal,
    path: TinkerPath,
    ttl_seconds: int | None,
    *,
    settings: Settings,
    now: datetime,
    request_id: str | None = None,
) -> Checkpoint:
    """``ttl_seconds`` counts from now; ``None`` removes the expiry."""
    principal.require_write()
    check_ttl(settings, ttl_seconds)
    ckpt = get_for(session, principal, path, now=now)
    if ckpt.pinned and ttl_seconds is not None:
        raise InvalidRequest(f"checkpoint {path} is pinned (never expires); unpin it first: weightstore unpin {path} --ttl S")
    ckpt.expires_at = expires_at_for(now, ttl_seconds)
    session.add(ckpt)
    ledger.on_ttl(session, ckpt, now=now)
    audit.record(
        session,
        at=now,
        action="checkpoint.ttl",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=str(path),
        request_id=request_id,
        ttl_seconds=ttl_seconds,
    )
    return ckpt


@dataclass(frozen=True)
class FileUrl:
    path: str
    size_bytes: int
    sha256: str
    url: str
    expires_at: datetime
    chunk_size: int | None = None
    """Bytes per chunk of ``chunk_sha256`` (issue 14); None: no chunk digests yet (verify the whole file)."""
    chunk_sha256: list[str] | None = None
    """sha256 of each ``chunk_size`` slice in order (``blobs.chunks``)."""


def download_urls(session: Session, ckpt: Checkpoint, *, store: ObjectStore, settings: Settings, now: datetime) -> list[FileUrl]:
    """Short-lived presigned GETs, one per file. Only live (verified) blobs are handed out."""
    ttl = settings.presign_ttl_seconds
    out: list[FileUrl] = []
    files = files_of(session, ckpt)
    digests = blob_chunks.get_many(session, [f.sha256 for f in files])
    for f in files:
        blob = session.get(Blob, f.sha256)
        if blob is None or blob.state != "live":
            raise NotFound(f"checkpoint {tinker_path(ckpt)} is being collected")
        leaf = f.path.rsplit("/", 1)[-1]
        out.append(
            FileUrl(
                f.path,
                f.size_bytes,
                f.sha256,
                store.presign_get(blob_key(f.sha256), ttl, filename=leaf),
                now + timedelta(seconds=ttl),
                *_chunk_fields(digests.get(f.sha256), f.size_bytes),
            )
        )
    return out


def _chunk_fields(chunks: blob_chunks.ChunkDigests | None, size: int) -> tuple[int | None, list[str] | None]:
    if chunks is None or not chunks.fits(size):
        return None, None
    return chunks.chunk_size, list(chunks.digests)
