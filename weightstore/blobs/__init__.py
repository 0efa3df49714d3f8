"""Blobs: content-addressed objects and their catalog rows, and the one state machine they follow.

A blob is the bytes of one file, stored once at ``blob_key(sha256)`` whoever uploaded them, with
one ``blob`` row. Its life (``blob.state``)::

    (no row) ──mark_live──▶ live ──tombstone──▶ deleting ──forget──▶ gone (no row, no object)
                             ▲ │                   │
                             └─┘ mark_live          └─ reusable / mark_live: CatalogBusy (retry)
                         (refresh, touch)

``pending`` exists in the schema (an upload's reservation) but nothing writes it today; the
collector treats it like ``live``.

Which storage rule of docs/design.md each function enforces:

- **S1** (bytes hash to their name): ``BlobWriter`` (``writer.py``), built by ``open_writer``; every
  object this module writes goes through it (``store_file``). ``fetch_to_file`` re-verifies on the
  way out and calls a mismatch ``DataLoss``.
- **S2** (object verified → row ``live`` → manifest): ``mark_live`` runs only after a writer
  finished (or the bytes were proven present); ``lock_live`` is the manifest commit's re-read of
  every referenced row, under the same row locks the collector's ``tombstone`` takes.
- **S6** (grace period): ``touch`` (and ``mark_live``) restart a blob's grace period; the collector
  only tombstones blobs unreferenced for longer than that.
- **S7** (``deleting`` is never handed out): ``reusable`` and ``mark_live`` are the one guard;
  both raise the retryable ``CatalogBusy``.
- Collector (docs/design-gc.md G7, G10): ``tombstone`` (re-check unreferenced and past grace,
  then ``deleting``) and ``forget`` (drop the rows of blobs whose object the store confirmed
  deleted). What counts as a reference is ``blobs.refs``.

Catalog functions take ``session`` first and never commit; ``open_writer``, ``store_file`` and
``fetch_to_file`` are workflows (object-store I/O between short transactions).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.blobs import chunks, refs
from weightstore.blobs.writer import BlobWriter, part_size_for, single_put_limit
from weightstore.context import Context
from weightstore.db import for_write, session_scope
from weightstore.errors import CatalogBusy, DataLoss
from weightstore.models import Blob, BlobState, Checkpoint, CheckpointFile, CheckpointState, TenantBlob
from weightstore.objectstore import blob_key

Progress = Callable[[int], None]
READ_CHUNK = 8 * 1024 * 1024  # local file → writer: large enough to keep the PUT busy, small enough to bound memory
TOMBSTONE_LOCK_TIMEOUT = "10s"  # PostgreSQL: give up a tombstone batch rather than stall writers longer


@dataclass(frozen=True)
class LocalFile:
    """One file on local disk, hashed, that is to become (or already is) a blob."""

    path: str
    """Relative path inside its checkpoint or model directory."""
    local: Path
    """Where the bytes are on this machine."""
    size_bytes: int
    sha256: str


# --- the state machine (catalog functions) ----------------------------------------------------


def _refuse_deleting(blob: Blob | None, what: str = "") -> None:
    """S7: the one "being deleted, retry" guard."""
    if blob is not None and blob.state == BlobState.deleting:
        prefix = f"{what}: " if what else ""
        raise CatalogBusy(f"{prefix}these bytes are being garbage-collected right now; retry in a minute")


def reusable(session: Session, sha256: str, *, what: str = "") -> Blob | None:
    """The ``live`` row holding these bytes, or None when they must be written. ``CatalogBusy``
    while the collector deletes them (S7): the caller retries later and then writes them anew."""
    blob = session.get(Blob, sha256)
    _refuse_deleting(blob, what)
    return blob if blob is not None and blob.state == BlobState.live else None


def mark_live(
    session: Session, sha256: str, size: int, now: datetime, *, chunk_digests: chunks.ChunkDigests | None = None
) -> None:
    """S2, second step: the object is durable and verified, so its row becomes (or stays) ``live``
    and its grace period restarts. ``CatalogBusy`` when the collector is deleting it (S7).
    ``chunk_digests``: recorded beside it (from the writer that verified the bytes, rule C1)."""
    if chunk_digests is not None:
        chunks.record(session, sha256, chunk_digests)
    blob = session.get(Blob, sha256)
    _refuse_deleting(blob)
    if blob is None:
        try:
            # A concurrent commit of the same new bytes may insert the row first (PostgreSQL; SQLite
            # serialises writers): then it exists, and is updated below like any live row.
            with session.begin_nested():
                row = Blob(sha256=sha256, size_bytes=size, state=BlobState.live, created_at=now, verified_at=now)
                row.last_referenced_at = now
                session.add(row)
            return
        except sa.exc.IntegrityError:
            blob = session.get(Blob, sha256, populate_existing=True)
            _refuse_deleting(blob)
            if blob is None:
                raise
    blob.state, blob.verified_at, blob.last_referenced_at = BlobState.live, blob.verified_at or now, now
    session.add(blob)


def touch(session: Session, shas: Sequence[str], now: datetime) -> None:
    """Restart the grace period of these blobs (S6): a reference just appeared or went away."""
    if shas:
        session.execute(sa.update(Blob).where(col(Blob.sha256).in_(sorted(set(shas)))).values(last_referenced_at=now))


def lock_live(session: Session, shas: Sequence[str]) -> tuple[dict[str, Blob], list[str]]:
    """S2, third step: re-read the rows a manifest is about to reference, under the row locks the
    collector's ``tombstone`` takes (PostgreSQL; SQLite serialises writers anyway). Returns the
    ``live`` rows by sha256 and the sha256s that are not live (missing or being deleted): a
    manifest MUST NOT be committed over those."""
    wanted = sorted(set(shas))
    q = for_write(select(Blob).where(col(Blob.sha256).in_(wanted)).order_by(col(Blob.sha256)))
    rows = {b.sha256: b for b in session.exec(q).all()}
    live = {sha: b for sha, b in rows.items() if b.state == BlobState.live}
    return live, [sha for sha in wanted if sha not in live]


def tombstone(session: Session, shas: Sequence[str], *, grace_cutoff: datetime, now: datetime) -> list[str]:
    """Collector (G7): re-check that each candidate is still unreferenced and unreferenced since
    before ``grace_cutoff``, and mark it ``deleting``. Returns the sha256s now tombstoned (earlier
    tombstones among ``shas`` included): only their objects may be deleted."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text(f"SET LOCAL lock_timeout = '{TOMBSTONE_LOCK_TIMEOUT}'"))
        # Row locks first (a manifest commit takes the same ones in lock_live), then block new
        # references in the tables that create them, then re-check: the re-check statement sees
        # every reference committed before the locks were granted.
        # Plain FOR UPDATE (not db.for_write): these rows may be deleted, which must also wait for
        # transactions inserting references to them (their FOR KEY SHARE locks).
        session.execute(
            sa.select(col(Blob.sha256)).where(col(Blob.sha256).in_(shas)).order_by(col(Blob.sha256)).with_for_update()
        )
        session.execute(sa.text(f"LOCK TABLE {', '.join(refs.REFERENCING_TABLES)} IN SHARE MODE"))
    fresh = [
        r[0]
        for r in session.execute(
            sa.select(col(Blob.sha256)).where(
                col(Blob.sha256).in_(shas),
                col(Blob.state).in_([BlobState.live.value, BlobState.pending.value]),
                col(Blob.last_referenced_at) < grace_cutoff,
                sa.not_(refs.is_referenced(col(Blob.sha256))),
            )
        ).all()
    ]
    if fresh:
        session.execute(
            sa.update(Blob).where(col(Blob.sha256).in_(fresh)).values(state=BlobState.deleting.value, tombstoned_at=now)
        )
    old = [
        r[0]
        for r in session.execute(
            sa.select(col(Blob.sha256)).where(col(Blob.sha256).in_(shas), col(Blob.state) == BlobState.deleting.value)
        ).all()
    ]
    return sorted(set(old) | set(fresh))


def forget(session: Session, shas: Sequence[str]) -> int:
    """Collector (G10): ``deleting`` → gone for blobs whose object the store confirmed deleted:
    the released manifests that still name them, the tenant proofs, then the row. Returns rows removed."""
    if not shas:
        return 0
    gone = [
        r[0]
        for r in session.execute(
            sa.select(col(Blob.sha256)).where(col(Blob.sha256).in_(shas), col(Blob.state) == BlobState.deleting.value)
        ).all()
    ]
    if not gone:
        return 0
    # Only manifests of deleted checkpoints can still name a tombstoned blob (G7 re-checked it).
    # Anything else (a bug elsewhere) makes the blob delete fail on the foreign key: loud, not lossy.
    # Driven by the sha256 index with a correlated EXISTS: an IN (SELECT deleted checkpoints)
    # made SQLite scan the manifest table per batch (measured ~1 s a batch at 20k checkpoints).
    released = sa.exists().where(
        col(Checkpoint.id) == col(CheckpointFile.checkpoint_id),
        col(Checkpoint.state) == CheckpointState.deleted.value,
    )
    session.execute(sa.delete(CheckpointFile).where(col(CheckpointFile.sha256).in_(gone), released))
    session.execute(sa.delete(TenantBlob).where(col(TenantBlob.sha256).in_(gone)))
    chunks.forget(session, gone)
    res = session.execute(sa.delete(Blob).where(col(Blob.sha256).in_(gone), col(Blob.state) == BlobState.deleting.value))
    return int(res.rowcount)  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result


def touch_unless_deleting(session: Session, shas: sa.Select[str], now: datetime) -> None:
    """Restart the grace period of the blobs ``shas`` selects, leaving tombstones alone (the
    collector closing an expired upload, G5)."""
    session.execute(
        sa.update(Blob)
        .where(col(Blob.sha256).in_(shas), col(Blob.state) != BlobState.deleting.value)
        .values(last_referenced_at=now)
    )


# --- writing and reading bytes (workflows) ----------------------------------------------------


def open_writer(ctx: Context, sha256: str, size: int, *, exists: bool = False) -> BlobWriter:
    """A ``BlobWriter`` configured from the settings (S1). ``exists``: the bytes are already stored
    and are only hashed (a tenant proving it holds them). Workflow: may start a multipart upload."""
    s = ctx.settings
    return BlobWriter(
        ctx.store,
        sha256=sha256,
        size=size,
        exists=exists,
        part_size=s.part_size_bytes,
        threshold=s.multipart_threshold_bytes,
        single_put_max=single_put_limit(s),
        chunk_size=s.chunk_size_bytes,
    )


def store_file(ctx: Context, f: LocalFile, *, progress: Progress | None = None) -> int:
    """Make ``f`` a live blob: reuse a live one (touched, so the collector leaves it alone for a
    grace period), else write it through a ``BlobWriter`` (the file may have changed since it was
    hashed: then nothing is stored and ``IntegrityError`` is raised) and mark it live (S2).
    Returns the bytes sent. Workflow."""
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        live = reusable(session, f.sha256, what=f.path)
        if live is not None:
            live.last_referenced_at = now
            session.add(live)
    if live is not None and ctx.store.head(blob_key(f.sha256)) is not None:
        if progress:
            progress(f.size_bytes)
        return 0
    writer = open_writer(ctx, f.sha256, f.size_bytes)
    try:
        with open(f.local, "rb") as fh:
            while data := fh.read(READ_CHUNK):
                writer.write(data)
                if progress:
                    progress(len(data))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    with session_scope(ctx.engine) as session:
        mark_live(session, f.sha256, f.size_bytes, ctx.clock.now(), chunk_digests=writer.chunk_digests)
    return f.size_bytes


def fetch_to_file(ctx: Context, sha256: str, size: int, dest: Path, *, progress: Progress | None = None, what: str = "") -> None:
    """Download one blob to ``dest`` (atomic: temp file, then rename), verifying size and sha256.
    A mismatch is ``DataLoss``: the store holds bytes that differ from what was verified at commit.
    Workflow (object-store I/O only)."""
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


__all__ = [
    "BlobWriter",
    "LocalFile",
    "chunks",
    "Progress",
    "fetch_to_file",
    "forget",
    "lock_live",
    "mark_live",
    "open_writer",
    "part_size_for",
    "refs",
    "reusable",
    "single_put_limit",
    "store_file",
    "tombstone",
    "touch",
    "touch_unless_deleting",
]
