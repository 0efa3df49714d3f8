"""The collector's phases: expire → mark → sweep → orphans. Each one plans, then (unless dry-run)
executes, and returns its plan and statistics (counts and bytes).

Every destructive batch is preceded by a lease check (``LeaseLost`` aborts the run) and deletes
only what the plan named *and* a fresh re-check in the same transaction still allows.
See docs/design-gc.md for the numbered rules (G1..G12) cited below.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from weightstore import checkpoints
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.models import (
    Blob,
    BlobState,
    Checkpoint,
    CheckpointFile,
    CheckpointState,
    GcLiveBlob,
    TenantBlob,
    Upload,
    UploadFile,
    UploadState,
)
from weightstore.objectstore import BLOB_PREFIX, STAGING_PREFIX, ObjectInfo, blob_key, sha256_from_key

from . import _debug, refs
from .lease import LeaseHandle

log = logging.getLogger("weightstore.gc")
METADATA_CHUNK = 500  # checkpoints per transaction in the expire phase: short write locks
LOCK_TIMEOUT = "10s"  # PostgreSQL: give up a tombstone batch rather than stall writers longer


@dataclass
class Finding:
    """One broken invariant or fail-closed stop."""

    kind: str
    """Stable type: ``missing_object``, ``referenced_blob_not_live``, ``size_mismatch``, ``hash_mismatch``,
    ``ledger_inconsistent``, ``garbage_blob_row``, ``garbage_object``, ``garbage_staging``."""
    subject: str
    """What it is about: a sha256, a key, a checkpoint id."""
    detail: str = ""
    severity: str = "error"
    """``error`` (data loss or its risk) or ``warning`` (garbage left behind: harmless)."""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail, "severity": self.severity}


@dataclass
class PhaseResult:
    plan: dict[str, int] = field(default_factory=dict)
    """What the phase intends to do: counts and bytes, computed before any change."""
    stats: dict[str, int] = field(default_factory=dict)
    """What it did."""
    findings: list[Finding] = field(default_factory=list)
    stop: bool = False
    """Fail closed: later destructive phases must not run."""


@dataclass
class Collection:
    """One collector run: shared by its phases."""

    ctx: Context
    run_id: str
    now: datetime
    dry_run: bool
    lease: LeaseHandle | None
    """None only for dry runs (they change nothing the lease protects)."""
    listing: dict[str, ObjectInfo] | None = None
    """The ``blobs/`` listing, taken once per run and shared by mark and orphans."""
    swept: set[str] = field(default_factory=set)
    """Blobs this run's sweep deleted: the (older) listing still shows them; orphans skips them."""

    @property
    def grace_cutoff(self) -> datetime:
        return self.now - timedelta(seconds=self.ctx.settings.gc_grace_seconds)

    def check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def blob_listing(self) -> dict[str, ObjectInfo]:
        if self.listing is None:
            out: dict[str, ObjectInfo] = {}
            for info in self.ctx.store.list_keys(BLOB_PREFIX):
                sha = sha256_from_key(info.key)
                if sha is not None:
                    out[sha] = info
            self.listing = out
        return self.listing


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


# --- expire ------------------------------------------------------------------------------------
def expire(c: Collection) -> PhaseResult:
    """TTL-elapsed checkpoints → ``expired`` (ledger ``end`` at ``expires_at``; restorable), and
    expired checkpoints older than the grace period → ``deleted`` (no longer restorable: their
    manifest stops protecting blobs, rule G4)."""
    res = PhaseResult()
    cutoff = c.grace_cutoff
    with session_scope(c.ctx.engine) as s:
        due = s.execute(sa.select(Checkpoint.id, Checkpoint.size_bytes).where(  # type: ignore[call-overload]
            Checkpoint.state == CheckpointState.committed.value, Checkpoint.expires_at <= c.now)).all()
        rel = s.execute(sa.select(Checkpoint.id, Checkpoint.size_bytes).where(  # type: ignore[call-overload]
            Checkpoint.state == CheckpointState.expired.value, Checkpoint.expires_at <= cutoff)).all()
    res.plan = {"expire_checkpoints": len(due), "expire_bytes": sum(r[1] for r in due),
                "release_checkpoints": len(rel), "release_bytes": sum(r[1] for r in rel)}
    res.stats = {"expired": 0, "released": 0}
    if c.dry_run:
        return res
    for chunk in _chunks([r[0] for r in due], METADATA_CHUNK):
        c.check_lease()
        with session_scope(c.ctx.engine) as s:
            # Re-check in the transaction: a TTL change or delete may have happened since the plan.
            for ckpt in s.exec(select(Checkpoint).where(Checkpoint.id.in_(chunk),  # type: ignore[attr-defined]
                                                        Checkpoint.state == CheckpointState.committed.value,
                                                        Checkpoint.expires_at <= c.now)).all():  # type: ignore[operator]
                assert ckpt.expires_at is not None
                checkpoints.end_checkpoint(s, ckpt, state=CheckpointState.expired, at=ckpt.expires_at, now=c.now)
                res.stats["expired"] += 1
    for chunk in _chunks([r[0] for r in rel], METADATA_CHUNK):
        c.check_lease()
        with session_scope(c.ctx.engine) as s:
            n = s.execute(sa.update(Checkpoint).where(
                Checkpoint.id.in_(chunk), Checkpoint.state == CheckpointState.expired.value,  # type: ignore[attr-defined]
                Checkpoint.expires_at <= cutoff).values(state=CheckpointState.deleted.value, deleted_at=c.now))  # type: ignore[operator]
            res.stats["released"] += n.rowcount  # type: ignore[attr-defined]
    return res


# --- mark --------------------------------------------------------------------------------------
def mark(c: Collection, *, check_objects: bool = True) -> PhaseResult:
    """Save the live set under the run id (one INSERT ... SELECT: one consistent snapshot), and
    fail closed (G6) if a committed reference has no live blob row or no object."""
    res = PhaseResult()
    with session_scope(c.ctx.engine) as s:
        live = refs.all_refs().subquery()
        s.execute(sa.insert(GcLiveBlob).from_select(["run_id", "sha256"],
                                                     sa.select(sa.literal(c.run_id), live.c.sha256).distinct()))
        n, nbytes = s.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(Blob.size_bytes), 0))
                              .select_from(GcLiveBlob).outerjoin(Blob, Blob.sha256 == GcLiveBlob.sha256)  # type: ignore[arg-type]
                              .where(GcLiveBlob.run_id == c.run_id)).one()  # type: ignore[arg-type]
        committed = refs.committed_refs().subquery()
        rows = s.execute(sa.select(committed.c.sha256, Blob.state, Blob.size_bytes)
                         .outerjoin(Blob, Blob.sha256 == committed.c.sha256)).all()  # type: ignore[arg-type]
    res.plan = {"live_blobs": int(n), "live_bytes": int(nbytes), "committed_refs": len(rows)}
    for sha, state, _size in rows:
        if state != BlobState.live.value:
            res.findings.append(Finding("referenced_blob_not_live", sha, f"blob row is {state or 'missing'}"))
    if check_objects:
        listing = c.blob_listing()
        for sha, state, size in rows:
            info = listing.get(sha)
            if state == BlobState.live.value and info is None:
                res.findings.append(Finding("missing_object", sha, "referenced blob has no object in the store"))
            elif info is not None and size is not None and info.size != size:
                res.findings.append(Finding("size_mismatch", sha, f"object has {info.size} bytes, row says {size}"))
    res.stop = bool(res.findings)
    if res.stop:
        log.error("mark found %d broken references: will not delete anything to prevent data loss", len(res.findings))
    return res


# --- sweep -------------------------------------------------------------------------------------
def sweep_candidates(c: Collection, mark_run_id: str) -> list[tuple[str, int, str]]:
    """Blobs outside the marked live set and unreferenced for longer than grace, plus tombstones
    left by an earlier run that crashed or failed to delete (G9)."""
    with session_scope(c.ctx.engine) as s:
        in_live = sa.select(GcLiveBlob.sha256).where(GcLiveBlob.run_id == mark_run_id)  # type: ignore[call-overload,arg-type]
        q = sa.select(Blob.sha256, Blob.size_bytes, Blob.state).where(sa.or_(  # type: ignore[call-overload]
            Blob.state == BlobState.deleting.value,
            sa.and_(Blob.state.in_([BlobState.live.value, BlobState.pending.value]),  # type: ignore[attr-defined]
                    Blob.last_referenced_at < c.grace_cutoff, Blob.sha256.notin_(in_live)))).order_by(Blob.sha256)  # type: ignore[attr-defined]
        return [(r[0], int(r[1]), r[2]) for r in s.execute(q).all()]


def _tombstone(c: Collection, shas: Sequence[str]) -> list[str]:
    """In one transaction: re-check every candidate is still unreferenced and past grace, and
    mark it ``deleting`` (G7). Returns the shas now tombstoned (old tombstones included)."""
    with session_scope(c.ctx.engine) as s:
        pg = s.get_bind().dialect.name == "postgresql"
        if pg:
            s.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            # Row locks first (the upload commit takes the same ones before it writes a manifest),
            # then block new references in the tables that create them, then re-check: the
            # re-check statement sees every reference committed before the locks were granted.
            s.execute(sa.select(Blob.sha256).where(Blob.sha256.in_(shas)).with_for_update())  # type: ignore[call-overload,attr-defined]
            s.execute(sa.text("LOCK TABLE checkpoint_file, upload_file, base_model_file IN SHARE MODE"))
        fresh = [r[0] for r in s.execute(sa.select(Blob.sha256).where(  # type: ignore[call-overload]
            Blob.sha256.in_(shas), Blob.state.in_([BlobState.live.value, BlobState.pending.value]),  # type: ignore[attr-defined]
            Blob.last_referenced_at < c.grace_cutoff, sa.not_(refs.is_referenced(Blob.sha256)))).all()]
        if fresh:
            s.execute(sa.update(Blob).where(Blob.sha256.in_(fresh))  # type: ignore[attr-defined]
                      .values(state=BlobState.deleting.value, tombstoned_at=c.now))
        old = [r[0] for r in s.execute(sa.select(Blob.sha256).where(  # type: ignore[call-overload]
            Blob.sha256.in_(shas), Blob.state == BlobState.deleting.value)).all()]
        return sorted(set(old) | set(fresh))


def _forget(c: Collection, shas: Sequence[str]) -> int:
    """Remove the rows of blobs whose object the store confirmed deleted (G10): the released
    manifests that still name them, the tenant proofs, then the blob row itself."""
    if not shas:
        return 0
    with session_scope(c.ctx.engine) as s:
        gone = sa.select(Blob.sha256).where(Blob.sha256.in_(shas), Blob.state == BlobState.deleting.value)  # type: ignore[call-overload,attr-defined]
        # Only manifests of deleted checkpoints can still name a tombstoned blob (G7 re-checked it).
        # Anything else (a bug elsewhere) makes the blob delete fail on the foreign key: loud, not lossy.
        released = sa.select(Checkpoint.id).where(Checkpoint.state == CheckpointState.deleted.value)  # type: ignore[call-overload]
        s.execute(sa.delete(CheckpointFile).where(CheckpointFile.sha256.in_(gone),  # type: ignore[attr-defined]
                                                  CheckpointFile.checkpoint_id.in_(released)))  # type: ignore[attr-defined]
        s.execute(sa.delete(TenantBlob).where(TenantBlob.sha256.in_(gone)))  # type: ignore[attr-defined]
        res = s.execute(sa.delete(Blob).where(Blob.sha256.in_(shas), Blob.state == BlobState.deleting.value))  # type: ignore[attr-defined]
        return int(res.rowcount)  # type: ignore[attr-defined]


def sweep(c: Collection, mark_run_id: str) -> PhaseResult:
    res = PhaseResult()
    cands = sweep_candidates(c, mark_run_id)
    sizes = {sha: size for sha, size, _ in cands}
    res.plan = {"candidates": len(cands), "candidate_bytes": sum(sizes.values()),
                "retry_tombstones": sum(1 for _, _, st in cands if st == BlobState.deleting.value)}
    res.stats = {"tombstoned": 0, "deleted_objects": 0, "deleted_bytes": 0, "delete_failures": 0,
                 "skipped_rereferenced": 0, "batches": 0}
    if c.dry_run:
        return res
    batch = c.ctx.settings.gc_delete_batch
    for i, chunk in enumerate(_chunks([sha for sha, _, _ in cands], batch)):
        if i:
            _debug.pause("between_batches")
        c.check_lease()
        try:
            dead = _tombstone(c, chunk)
        except sa.exc.OperationalError as exc:  # lock timeout: writers are busy; leave it to the next run
            log.warning("sweep batch skipped: %s", exc)
            res.findings.append(Finding("batch_skipped", chunk[0], "catalog busy", severity="warning"))
            continue
        res.stats["tombstoned"] += len(dead)
        res.stats["skipped_rereferenced"] += len(chunk) - len(dead)
        _debug.pause("after_tombstone")
        c.check_lease()
        try:
            deleted, failed = c.ctx.store.delete_many([blob_key(sha) for sha in dead])
        except Exception as exc:  # noqa: BLE001 - store down: the tombstones stay, the next run retries (G9)
            log.warning("sweep delete batch failed: %s", exc)
            res.stats["delete_failures"] += len(dead)
            res.findings.append(Finding("delete_failed", dead[0] if dead else "", str(exc), severity="warning"))
            res.stats["batches"] += 1
            continue
        confirmed = [s for key in deleted if (s := sha256_from_key(key)) is not None and s in set(dead)]
        res.stats["delete_failures"] += len(failed)
        c.swept.update(confirmed)
        res.stats["deleted_objects"] += _forget(c, confirmed)
        res.stats["deleted_bytes"] += sum(sizes.get(s, 0) for s in confirmed)
        res.stats["batches"] += 1
    return res


# --- orphans -----------------------------------------------------------------------------------
def _staging_upload_id(key: str) -> str | None:
    parts = key[len(STAGING_PREFIX):].split("/")
    return parts[0] if len(parts) >= 2 and parts[0] else None


def orphans(c: Collection) -> PhaseResult:
    """Close expired uploads; delete staging objects of closed uploads, ``blobs/`` objects without
    a row (older than grace) and abort multipart uploads older than the upload expiry (G11)."""
    res = PhaseResult()
    s_ = c.ctx.settings
    cutoff = c.grace_cutoff
    mpu_cutoff = c.now - timedelta(seconds=s_.upload_expiry_seconds)
    with session_scope(c.ctx.engine) as s:
        stale_uploads = [r[0] for r in s.execute(sa.select(Upload.id).where(  # type: ignore[call-overload]
            Upload.state == UploadState.open.value, Upload.expires_at <= c.now)).all()]
        known_rows = {r[0] for r in s.execute(sa.select(Blob.sha256)).all()}  # type: ignore[call-overload]
        open_uploads = {r[0] for r in s.execute(sa.select(Upload.id).where(  # type: ignore[call-overload]
            Upload.state == UploadState.open.value, Upload.expires_at > c.now)).all()}
        upload_ids = {r[0] for r in s.execute(sa.select(Upload.id)).all()}  # type: ignore[call-overload]
    listing = c.blob_listing()
    orphan_blobs = [info for sha, info in sorted(listing.items())
                    if sha not in known_rows and sha not in c.swept and _older(info, cutoff)]
    staging = [info for info in c.ctx.store.list_keys(STAGING_PREFIX)
               if (uid := _staging_upload_id(info.key)) is not None and uid not in open_uploads
               and (uid in upload_ids or _older(info, cutoff))]
    mpus = [u for u in c.ctx.store.list_multipart_uploads("")
            if (init := u.get("Initiated")) is not None and init < mpu_cutoff]
    res.plan = {"close_uploads": len(stale_uploads), "orphan_objects": len(orphan_blobs),
                "orphan_bytes": sum(i.size for i in orphan_blobs), "staging_objects": len(staging),
                "staging_bytes": sum(i.size for i in staging), "stale_multipart": len(mpus)}
    res.stats = {"closed_uploads": 0, "deleted_orphans": 0, "deleted_staging": 0, "aborted_multipart": 0}
    if c.dry_run:
        return res
    for chunk in _chunks(stale_uploads, METADATA_CHUNK):
        c.check_lease()
        res.stats["closed_uploads"] += _close_uploads(c, chunk)
    batch = s_.gc_delete_batch
    for chunk in _chunks(orphan_blobs, batch):
        c.check_lease()
        with session_scope(c.ctx.engine) as s:  # re-check: a row may have appeared since the listing
            has_row = {r[0] for r in s.execute(sa.select(Blob.sha256).where(  # type: ignore[call-overload]
                Blob.sha256.in_([sha256_from_key(i.key) for i in chunk]))).all()}  # type: ignore[attr-defined]
        keys = [i.key for i in chunk if sha256_from_key(i.key) not in has_row]
        deleted, _failed = _delete_quietly(c, keys)
        res.stats["deleted_orphans"] += len(deleted)
    for chunk in _chunks(staging, batch):
        c.check_lease()
        deleted, _failed = _delete_quietly(c, [i.key for i in chunk])
        res.stats["deleted_staging"] += len(deleted)
    for u in mpus:
        c.check_lease()
        try:
            c.ctx.store.abort_multipart(u["Key"], u["UploadId"])
            res.stats["aborted_multipart"] += 1
        except Exception as exc:  # noqa: BLE001 - garbage only: retried next run
            log.warning("abort multipart %s failed: %s", u.get("Key"), exc)
    return res


def _older(info: ObjectInfo, cutoff: datetime) -> bool:
    return info.last_modified is not None and info.last_modified < cutoff


def _delete_quietly(c: Collection, keys: list[str]) -> tuple[list[str], dict[str, str]]:
    if not keys:
        return [], {}
    try:
        return c.ctx.store.delete_many(keys)
    except Exception as exc:  # noqa: BLE001 - garbage only: the next run retries
        log.warning("orphan delete batch failed: %s", exc)
        return [], {k: str(exc) for k in keys}


def _close_uploads(c: Collection, upload_ids: Sequence[str]) -> int:
    with session_scope(c.ctx.engine) as s:
        n = s.execute(sa.update(Upload).where(Upload.id.in_(upload_ids), Upload.state == UploadState.open.value,  # type: ignore[attr-defined]
                                              Upload.expires_at <= c.now).values(state=UploadState.expired.value))
        # The grace period of their blobs starts now, not at their last write (G5).
        shas = sa.select(UploadFile.sha256).where(UploadFile.upload_id.in_(upload_ids))  # type: ignore[call-overload,attr-defined]
        s.execute(sa.update(Blob).where(Blob.sha256.in_(shas), Blob.state != BlobState.deleting.value)  # type: ignore[attr-defined]
                  .values(last_referenced_at=c.now))
        mpus = s.execute(sa.select(UploadFile.staging_key, UploadFile.multipart_upload_id).where(  # type: ignore[call-overload]
            UploadFile.upload_id.in_(upload_ids), UploadFile.multipart_upload_id.is_not(None))).all()  # type: ignore[attr-defined,union-attr]
    for key, mpu in mpus:
        try:
            c.ctx.store.abort_multipart(key, mpu)
        except Exception as exc:  # noqa: BLE001 - garbage only
            log.warning("abort multipart %s failed: %s", key, exc)
    return int(n.rowcount)  # type: ignore[attr-defined]


