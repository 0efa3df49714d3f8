"""The collector's phases: expire → invoices → mark → sweep → orphans → archives. Each one plans, then
(unless dry-run) executes, and returns its plan and statistics (counts and bytes).

``invoices`` (close ended months into frozen invoices) and ``archives`` (prune the legacy archive
cache) delete no bytes; they ride on the collector because they must run on a schedule, once, under
the lease (issue 12, part 7; issue 11 residue).

Every destructive batch is preceded by a lease check (``LeaseLost`` aborts the run) and deletes
only what the plan named *and* a fresh re-check in the same transaction still allows.
See docs/design-gc.md for the numbered rules (G1..G12) cited below.

Each phase is a workflow (docs/design.md, transaction convention): it interleaves object-store
calls with catalog steps, so it opens one short ``session_scope`` per step and never holds a
transaction across a listing, a HEAD or a delete.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from weightstore import blobs, checkpoints, policies
from weightstore.billing import invoices as billing_invoices
from weightstore.billing.pricing import load_pricing
from weightstore.blobs import refs
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import CatalogBusy
from weightstore.models import (
    Blob,
    BlobState,
    Checkpoint,
    CheckpointState,
    GcLiveBlob,
    Upload,
    UploadFile,
    UploadState,
)
from weightstore.objectstore import BLOB_PREFIX, STAGING_PREFIX, ObjectInfo, blob_key, sha256_from_key
from weightstore.tinker import archive

from .hooks import NO_HOOKS, CollectorHooks
from .lease import LeaseHandle

log = logging.getLogger("weightstore.gc")
METADATA_CHUNK = 2000  # checkpoints per transaction in the expire phase: short write locks, few bound params
STREAM_ROWS = 5000  # rows fetched at a time when a phase must look at every reference
MAX_FINDINGS = 1000  # objects missing from the listing re-checked with HEAD: enough to diagnose a loss
MAX_PLAN_ITEMS = 1000  # policy expiries listed one by one in a plan (the counts are always complete)
MAX_CLOSES_PER_RUN = 200
"""Invoices frozen per run at most: a backlog (a catalog older than this phase) is worked off over a
few runs, oldest month first, instead of one long run."""
DELETE_CONCURRENCY = 4
"""S3 DeleteObjects calls (≤1000 keys each) in flight at once during a sweep. A single call is
bounded by the store's per-key work (SeaweedFS: ~1,000 keys/s per call); calls in parallel use
more of it. Small, so a sweep never floods a shared store."""


@dataclass
class Finding:
    """One broken invariant or fail-closed stop."""

    kind: str
    """Stable type: ``missing_object``, ``referenced_blob_not_live``, ``size_mismatch``, ``hash_mismatch``,
    ``ledger_inconsistent``, ``garbage_blob_row``, ``garbage_object``, ``garbage_staging``; warnings
    of the bookkeeping phases: ``invoice_not_closed``, ``batch_skipped``."""
    subject: str
    """What it is about: a sha256, a key, a checkpoint id."""
    detail: str = ""
    severity: str = "error"
    """``error`` (data loss or its risk) or ``warning`` (garbage left behind: harmless)."""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail, "severity": self.severity}


@dataclass
class PhaseResult:
    plan: dict[str, Any] = field(default_factory=dict)
    """What the phase intends to do: counts and bytes, computed before any change (the expire
    phase also lists its policy expiries under ``policy_expire``: id, path and the rule)."""
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
    hooks: CollectorHooks = NO_HOOKS
    """Test-only stopping points; production runs with the no-op default."""

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
        yield items[i : i + n]


# --- expire ------------------------------------------------------------------------------------
def expire(c: Collection) -> PhaseResult:
    """Checkpoints a retention policy no longer keeps (``weightstore.policies``) and TTL-elapsed
    ones → ``expired`` (ledger ``end`` at ``expires_at``, which a policy expiry sets to ``now``;
    restorable; blobs touched with ``expires_at``; pinned ones never), then checkpoints more than
    one grace period past ``expires_at`` →
    ``deleted`` (no longer restorable: their manifest stops protecting blobs, rule G4). Both steps
    are set-based and chunked: a few statements per ``METADATA_CHUNK`` checkpoints, whatever the
    catalog size, and nothing is loaded but one chunk of ids. A checkpoint the collector first sees
    more than grace past its ``expires_at`` (the collector was down) is expired and released in the
    same run: its restore window is over either way."""
    res = PhaseResult()
    cutoff = c.grace_cutoff
    expired_or_due = col(Checkpoint.state).in_([CheckpointState.committed.value, CheckpointState.expired.value])
    with session_scope(c.ctx.engine) as s:
        by_policy = policies.due_by_policy(s, now=c.now)
        n_due, b_due = s.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(Checkpoint.size_bytes), 0)).where(
                col(Checkpoint.state) == CheckpointState.committed.value,
                col(Checkpoint.expires_at) <= c.now,
                sa.not_(col(Checkpoint.pinned)),
            )
        ).one()
        n_rel, b_rel = s.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(Checkpoint.size_bytes), 0)).where(
                expired_or_due, col(Checkpoint.expires_at) <= cutoff
            )
        ).one()
    res.plan = {
        "expire_checkpoints": int(n_due),
        "expire_bytes": int(b_due),
        "release_checkpoints": int(n_rel),
        "release_bytes": int(b_rel),
        "policy_expire_checkpoints": len(by_policy),
        "policy_expire_bytes": sum(e.size_bytes for e in by_policy),
        "policy_expire": [e.to_dict() for e in by_policy[:MAX_PLAN_ITEMS]],
    }
    res.stats = {"expired_by_policy": 0, "expired": 0, "released": 0}
    if c.dry_run:
        return res
    # The plan's picks, each re-checked (still visible, not pinned) in the transaction that expires it.
    for chunk in _chunks([e.checkpoint_id for e in by_policy], METADATA_CHUNK):
        c.check_lease()
        with session_scope(c.ctx.engine) as s:
            res.stats["expired_by_policy"] += len(policies.expire_by_policy(s, chunk, now=c.now))
    while True:  # each chunk re-selects what is still due: a TTL change or restore since the plan wins
        c.check_lease()
        with session_scope(c.ctx.engine) as s:
            n = len(checkpoints.expire_due(s, now=c.now, limit=METADATA_CHUNK))
        res.stats["expired"] += n
        if n < METADATA_CHUNK:
            break
    released = sa.and_(col(Checkpoint.state) == CheckpointState.expired.value, col(Checkpoint.expires_at) <= cutoff)
    while True:
        c.check_lease()
        with session_scope(c.ctx.engine) as s:
            pick = sa.select(col(Checkpoint.id)).where(released).limit(METADATA_CHUNK)
            result = s.execute(
                sa.update(Checkpoint)
                .where(col(Checkpoint.id).in_(pick.scalar_subquery()), released)
                .values(state=CheckpointState.deleted.value, deleted_at=c.now)
            )
            n = int(result.rowcount)  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result
        res.stats["released"] += n
        if n < METADATA_CHUNK:
            break
    return res


# --- mark --------------------------------------------------------------------------------------
def mark(c: Collection, *, check_objects: bool = True) -> PhaseResult:
    """Save the live set under the run id (one INSERT ... SELECT: one consistent snapshot), and
    fail closed (G6) if a committed reference has no live blob row or no object.

    The object check streams the committed references of that same snapshot against the
    ``blobs/`` listing, taken just before it. A reference whose object is not in the listing is
    HEADed after the transaction: an object written between the listing and the snapshot is not
    a loss. Memory holds the listing, never the catalog's references."""
    res = PhaseResult()
    listing = c.blob_listing() if check_objects else {}
    suspects: list[str] = []
    with session_scope(c.ctx.engine) as s:
        live = refs.all_refs().subquery()
        s.execute(
            sa.insert(GcLiveBlob).from_select(["run_id", "sha256"], sa.select(sa.literal(c.run_id), live.c.sha256).distinct())
        )
        n, nbytes = s.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(Blob.size_bytes), 0))
            .select_from(GcLiveBlob)
            .outerjoin(Blob, col(Blob.sha256) == col(GcLiveBlob.sha256))
            .where(col(GcLiveBlob.run_id) == c.run_id)
        ).one()
        committed = refs.committed_refs().subquery()
        q = sa.select(committed.c.sha256, col(Blob.state), col(Blob.size_bytes)).outerjoin(
            Blob, col(Blob.sha256) == committed.c.sha256
        )
        n_refs = 0
        for sha, state, size in s.execute(q.execution_options(yield_per=STREAM_ROWS)):
            n_refs += 1
            if state != BlobState.live.value:
                res.findings.append(Finding("referenced_blob_not_live", sha, f"blob row is {state or 'missing'}"))
            if not check_objects:
                continue
            info = listing.get(sha)
            if state == BlobState.live.value and info is None:
                if len(suspects) < MAX_FINDINGS:
                    suspects.append(sha)
            elif info is not None and size is not None and info.size != size:
                res.findings.append(Finding("size_mismatch", sha, f"object has {info.size} bytes, row says {size}"))
    res.plan = {"live_blobs": int(n), "live_bytes": int(nbytes), "committed_refs": n_refs}
    for sha in suspects:
        if c.ctx.store.head(blob_key(sha)) is None:
            res.findings.append(Finding("missing_object", sha, "referenced blob has no object in the store"))
    res.stop = bool(res.findings)
    if res.stop:
        log.error("mark found %d broken references: will not delete anything to prevent data loss", len(res.findings))
    return res


# --- sweep -------------------------------------------------------------------------------------
def _candidate_clause(c: Collection, mark_run_id: str) -> sa.ColumnElement[bool]:
    """Blobs outside the marked live set and unreferenced for longer than grace, plus tombstones
    left by an earlier run that crashed or failed to delete (G9)."""
    # NOT EXISTS, not NOT IN: PostgreSQL plans NOT IN over a live set larger than work_mem as a
    # per-row rescan (measured: 227 s for a 100k catalog); NOT EXISTS is a hash anti-join.
    in_live = sa.exists().where(col(GcLiveBlob.run_id) == mark_run_id, col(GcLiveBlob.sha256) == col(Blob.sha256))
    return sa.or_(
        col(Blob.state) == BlobState.deleting.value,
        sa.and_(
            col(Blob.state).in_([BlobState.live.value, BlobState.pending.value]),
            col(Blob.last_referenced_at) < c.grace_cutoff,
            ~in_live,
        ),
    )


def sweep_candidates(c: Collection, mark_run_id: str, *, after: str = "", limit: int | None = None) -> list[tuple[str, int, str]]:
    """One page (keyset on sha256) of sweep candidates: (sha256, size, state)."""
    with session_scope(c.ctx.engine) as s:
        q = (
            sa.select(col(Blob.sha256), col(Blob.size_bytes), col(Blob.state))
            .where(col(Blob.sha256) > after, _candidate_clause(c, mark_run_id))
            .order_by(Blob.sha256)
        )
        if limit is not None:
            q = q.limit(limit)
        return [(r[0], int(r[1]), r[2]) for r in s.execute(q).all()]


def _tombstone(c: Collection, shas: Sequence[str]) -> list[str]:
    """In one transaction: re-check every candidate is still unreferenced and past grace, and
    mark it ``deleting`` (G7, ``blobs.tombstone``). Returns the shas now tombstoned (old tombstones included)."""
    with session_scope(c.ctx.engine) as s:
        return blobs.tombstone(s, shas, grace_cutoff=c.grace_cutoff, now=c.now)


def _forget(c: Collection, shas: Sequence[str]) -> int:
    """Remove the rows of blobs whose object the store confirmed deleted (G10, ``blobs.forget``)."""
    if not shas:
        return 0
    with session_scope(c.ctx.engine) as s:
        return blobs.forget(s, shas)


def sweep(c: Collection, mark_run_id: str) -> PhaseResult:
    """Page through the candidates (≤ ``gc_delete_batch`` a page, keyset order: memory is one page
    per batch in flight); per page: lease check, tombstone transaction (G7), lease check, then the
    S3 DeleteObjects call is handed to a small pool so that up to ``DELETE_CONCURRENCY`` calls are
    in flight while the next pages are tombstoned. Rows are forgotten, on this thread, only for
    the keys a finished call confirmed deleted (G10); a failed call leaves its tombstones (G9)."""
    res = PhaseResult()
    clause = _candidate_clause(c, mark_run_id)
    with session_scope(c.ctx.engine) as s:
        n, nbytes, retry = s.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(Blob.size_bytes), 0),
                sa.func.coalesce(sa.func.sum(sa.case((col(Blob.state) == BlobState.deleting.value, 1), else_=0)), 0),
            ).where(clause)
        ).one()
    res.plan = {"candidates": int(n), "candidate_bytes": int(nbytes), "retry_tombstones": int(retry)}
    res.stats = {
        "tombstoned": 0,
        "deleted_objects": 0,
        "deleted_bytes": 0,
        "delete_failures": 0,
        "skipped_rereferenced": 0,
        "batches": 0,
    }
    if c.dry_run:
        return res
    in_flight: dict[Future[tuple[list[str], dict[str, str]]], tuple[list[str], dict[str, int]]] = {}

    def finish(fut: Future[tuple[list[str], dict[str, str]]]) -> None:
        dead, sizes = in_flight.pop(fut)
        res.stats["batches"] += 1
        try:
            deleted, failed = fut.result()
        except Exception as exc:  # noqa: BLE001 - store down: the tombstones stay, the next run retries (G9)
            log.warning("sweep delete batch failed: %s", exc)
            res.stats["delete_failures"] += len(dead)
            res.findings.append(Finding("delete_failed", dead[0] if dead else "", str(exc), severity="warning"))
            return
        asked = set(dead)
        confirmed = [s for key in deleted if (s := sha256_from_key(key)) is not None and s in asked]
        res.stats["delete_failures"] += len(failed)
        c.swept.update(confirmed)
        res.stats["deleted_objects"] += _forget(c, confirmed)
        res.stats["deleted_bytes"] += sum(sizes[s] for s in confirmed)

    def drain(all_: bool) -> None:
        while in_flight:
            done, _ = wait(list(in_flight), return_when=ALL_COMPLETED if all_ else FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: in_flight[f][0][:1]):  # deterministic order of row writes
                finish(fut)
            if not all_:
                return

    batch = c.ctx.settings.gc_delete_batch
    after, first = "", True
    with ThreadPoolExecutor(DELETE_CONCURRENCY, thread_name_prefix="gc-delete") as pool:
        while page := sweep_candidates(c, mark_run_id, after=after, limit=batch):
            after = page[-1][0]
            if not first:
                c.hooks.between_batches(lambda: drain(True))
            first = False
            if len(in_flight) >= DELETE_CONCURRENCY:
                drain(False)
            c.check_lease()
            chunk = [sha for sha, _, _ in page]
            try:
                dead = _tombstone(c, chunk)
            except (sa.exc.OperationalError, CatalogBusy) as exc:  # lock timeout: writers are busy; leave it to the next run
                log.warning("sweep batch skipped: %s", exc)
                res.findings.append(Finding("batch_skipped", chunk[0], "catalog busy", severity="warning"))
                continue
            res.stats["tombstoned"] += len(dead)
            res.stats["skipped_rereferenced"] += len(chunk) - len(dead)
            c.hooks.after_tombstone()
            if not dead:
                continue
            c.check_lease()  # G12: right before the destructive call is submitted
            in_flight[pool.submit(c.ctx.store.delete_many, [blob_key(sha) for sha in dead])] = (
                dead,
                {sha: size for sha, size, _ in page},
            )
        drain(True)
    return res


# --- orphans -----------------------------------------------------------------------------------
def _staging_upload_id(key: str) -> str | None:
    parts = key[len(STAGING_PREFIX) :].split("/")
    return parts[0] if len(parts) >= 2 and parts[0] else None


def orphans(c: Collection) -> PhaseResult:
    """Close expired uploads; delete staging objects of closed uploads, ``blobs/`` objects without
    a row (older than grace) and abort multipart uploads older than the upload expiry (G11)."""
    res = PhaseResult()
    s_ = c.ctx.settings
    cutoff = c.grace_cutoff
    mpu_cutoff = c.now - timedelta(seconds=s_.upload_expiry_seconds)
    with session_scope(c.ctx.engine) as s:
        stale_uploads = [
            r[0]
            for r in s.execute(
                sa.select(col(Upload.id)).where(col(Upload.state) == UploadState.open.value, col(Upload.expires_at) <= c.now)
            ).all()
        ]
    listing = c.blob_listing()
    old = [info for sha, info in sorted(listing.items()) if sha not in c.swept and _older(info, cutoff)]
    orphan_blobs = [info for chunk in _chunks(old, c.ctx.settings.gc_delete_batch) for info in _without_row(c, chunk)]
    staged = [(uid, info) for info in c.ctx.store.list_keys(STAGING_PREFIX) if (uid := _staging_upload_id(info.key)) is not None]
    with session_scope(c.ctx.engine) as s:  # only the uploads the staging area names
        uids = sorted({uid for uid, _ in staged})
        known: dict[str, bool] = {}
        for chunk in _chunks(uids, c.ctx.settings.gc_delete_batch):
            for uid, state, exp in s.execute(
                sa.select(col(Upload.id), col(Upload.state), col(Upload.expires_at)).where(col(Upload.id).in_(chunk))
            ).all():
                known[uid] = state == UploadState.open.value and exp > c.now
    staging = [info for uid, info in staged if not known.get(uid, False) and (uid in known or _older(info, cutoff))]
    mpus = [u for u in c.ctx.store.list_multipart_uploads("") if (init := u.get("Initiated")) is not None and init < mpu_cutoff]
    res.plan = {
        "close_uploads": len(stale_uploads),
        "orphan_objects": len(orphan_blobs),
        "orphan_bytes": sum(i.size for i in orphan_blobs),
        "staging_objects": len(staging),
        "staging_bytes": sum(i.size for i in staging),
        "stale_multipart": len(mpus),
    }
    res.stats = {"closed_uploads": 0, "deleted_orphans": 0, "deleted_staging": 0, "aborted_multipart": 0}
    if c.dry_run:
        return res
    for chunk in _chunks(stale_uploads, METADATA_CHUNK):
        c.check_lease()
        res.stats["closed_uploads"] += _close_uploads(c, chunk)
    batch = s_.gc_delete_batch
    for chunk in _chunks(orphan_blobs, batch):
        c.check_lease()
        keys = [i.key for i in _without_row(c, chunk)]  # re-check: a row may have appeared since the plan
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


def _without_row(c: Collection, infos: Sequence[ObjectInfo]) -> list[ObjectInfo]:
    """The listed ``blobs/`` objects that have no blob row and that no open upload declares (a
    presigned PUT writes the blob key before its commit adds the row); one IN query each per ≤1000."""
    shas = [sha256_from_key(i.key) for i in infos]
    with session_scope(c.ctx.engine) as s:
        keep = {r[0] for r in s.execute(sa.select(col(Blob.sha256)).where(col(Blob.sha256).in_(shas))).all()}
        keep |= {
            r[0]
            for r in s.execute(
                sa.select(col(UploadFile.sha256))
                .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
                .where(
                    col(UploadFile.sha256).in_(shas),
                    col(Upload.state) == UploadState.open.value,
                    col(Upload.expires_at) > c.now,
                )
            ).all()
        }
    return [i for i in infos if sha256_from_key(i.key) not in keep]


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
        n = s.execute(
            sa.update(Upload)
            .where(
                col(Upload.id).in_(upload_ids),
                col(Upload.state) == UploadState.open.value,
                col(Upload.expires_at) <= c.now,
            )
            .values(state=UploadState.expired.value)
        )
        # The grace period of their blobs starts now, not at their last write (G5).
        shas = sa.select(col(UploadFile.sha256)).where(col(UploadFile.upload_id).in_(upload_ids))
        blobs.touch_unless_deleting(s, shas, c.now)
        mpus = s.execute(
            sa.select(col(UploadFile.staging_key), col(UploadFile.multipart_upload_id)).where(
                col(UploadFile.upload_id).in_(upload_ids), col(UploadFile.multipart_upload_id).is_not(None)
            )
        ).all()
    for key, mpu in mpus:
        try:
            c.ctx.store.abort_multipart(key, mpu)
        except Exception as exc:  # noqa: BLE001 - garbage only
            log.warning("abort multipart %s failed: %s", key, exc)
    return int(n.rowcount)  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result


# --- invoices ----------------------------------------------------------------------------------
def close_invoices(c: Collection) -> PhaseResult:
    """Freeze every billed tenant's ended months that are not frozen yet (``invoices.months_to_close``;
    operator tenants are not billed and never closed), oldest first per tenant, one short transaction
    and one lease check per month, at most ``MAX_CLOSES_PER_RUN`` a run. Idempotent: a month frozen
    meanwhile (read by someone, or closed by an earlier run) is left exactly as it is
    (``invoices.freeze_month``); a ledger correction after the close becomes an adjustment on the
    next invoice, never a change to this one. A month that fails to close is a warning finding (the
    tenant's later months wait for the next run); it never stops the storage phases after it."""
    res = PhaseResult()
    with session_scope(c.ctx.engine) as s:
        due = billing_invoices.months_to_close(s, now=c.now)
    res.plan = {"close_months": len(due), "close_tenants": len({t for t, _ in due})}
    res.stats = {"closed_months": 0, "already_frozen": 0, "deferred_months": max(0, len(due) - MAX_CLOSES_PER_RUN)}
    if c.dry_run:
        return res
    failed: set[str] = set()
    for tenant_id, month in due[:MAX_CLOSES_PER_RUN]:
        if tenant_id in failed:  # its later months wait: a close carries the adjustments of the earlier ones
            res.stats["deferred_months"] += 1
            continue
        c.check_lease()
        try:
            with session_scope(c.ctx.engine) as s:
                pricing = load_pricing(s, c.ctx.settings)
                _, wrote = billing_invoices.freeze_month(s, pricing, tenant_id=tenant_id, month=month, now=c.now)
        except Exception as exc:  # noqa: BLE001 - billing must never stop the storage phases; the next run retries
            log.warning("closing %s of tenant %s failed: %s", month, tenant_id, exc)
            res.findings.append(Finding("invoice_not_closed", f"{tenant_id}/{month}", str(exc), severity="warning"))
            failed.add(tenant_id)
            res.stats["deferred_months"] += 1
            continue
        res.stats["closed_months" if wrote else "already_frozen"] += 1
    return res


# --- archives ----------------------------------------------------------------------------------
def prune_archives(c: Collection) -> PhaseResult:
    """Remove ``archive_cache`` rows that can never be served again (``archive.stale_cache_clause``:
    checkpoint gone or not visible, or archive blob not live). Rows only: the archive blob is not a
    reference and the sweep reclaims it after its grace period like any unreferenced blob."""
    res = PhaseResult()
    with session_scope(c.ctx.engine) as s:
        n, nbytes = archive.stale_cache_rows(s, now=c.now)
    res.plan = {"stale_archive_rows": n, "stale_archive_bytes": nbytes}
    res.stats = {"pruned_archive_rows": 0}
    if c.dry_run:
        return res
    while True:
        c.check_lease()
        try:
            with session_scope(c.ctx.engine) as s:
                n = archive.prune_cache(s, now=c.now, limit=METADATA_CHUNK)
        except (sa.exc.OperationalError, CatalogBusy) as exc:  # writers busy: a stale row only costs a miss; next run
            res.findings.append(Finding("batch_skipped", "archive_cache", str(exc), severity="warning"))
            break
        res.stats["pruned_archive_rows"] += n
        if n < METADATA_CHUNK:
            break
    return res
