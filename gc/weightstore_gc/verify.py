"""``verify``: re-check every storage invariant and report typed findings (changes nothing).

- every blob a committed/expired checkpoint, base model or running export references has a
  ``live`` row (V1), an object (V2) of the right size (V3) and — for a sample — the right sha256 (V4);
- manifest sizes match their blob (V3);
- the usage ledger is consistent with checkpoint states (V5): one ``commit`` per checkpoint, and
  ``end`` events = ``restore`` events (+1 once the checkpoint is no longer committed);
- with ``expect_collected=True`` (tests, after a full collection past grace): no unreferenced blob
  row, no ``blobs/`` object without a row, no staging object of a closed upload (V6, warnings).

A workflow (it interleaves catalog reads with store listings, HEADs and GETs): one short read
transaction per step, none held across object-store I/O.

Verify runs beside live collectors and writers (issue 13, found 6): the listing, the catalog read
and the hashing are different moments. A blob found missing (not listed, or gone when hashed) is
re-checked: HEAD again (a blob committed after the listing is there now), then the catalog (a blob
no longer referenced was collected meanwhile: not an error, counted in ``stats["vanished"]``). Only
a blob still referenced and still missing is a ``missing_object`` finding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import col

from weightstore.blobs import refs
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import NotFound
from weightstore.models import (
    Blob,
    BlobState,
    Checkpoint,
    CheckpointFile,
    CheckpointState,
    Upload,
    UploadState,
    UsageEvent,
    UsageEventKind,
)
from weightstore.objectstore import BLOB_PREFIX, STAGING_PREFIX, ObjectInfo, blob_key, sha256_from_key

from .hooks import NO_HOOKS, CollectorHooks
from .phases import Finding


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


def _still_referenced(ctx: Context, sha: str) -> bool:
    """Whether ``sha`` is referenced *now* by something whose bytes must exist (its own transaction)."""
    with session_scope(ctx.engine) as s:
        committed = refs.committed_refs().subquery()
        return s.execute(sa.select(committed.c.sha256).where(committed.c.sha256 == sha).limit(1)).first() is not None


def _recheck_missing(ctx: Context, rep: VerifyReport, sha: str, why: str) -> ObjectInfo | None:
    """A referenced blob verify did not find: its object if it is there now, else ``None`` after
    reporting ``missing_object`` when the catalog still references it (else counting it vanished)."""
    info = ctx.store.head(blob_key(sha))
    if info is not None:
        return info
    if _still_referenced(ctx, sha):
        rep.findings.append(Finding("missing_object", sha, why))
    else:
        rep.stats["vanished"] = rep.stats.get("vanished", 0) + 1
    return None


def verify(
    ctx: Context,
    *,
    hash_sample: int = 0,
    expect_collected: bool = False,
    seed: int | None = None,
    hooks: CollectorHooks = NO_HOOKS,
) -> VerifyReport:
    rep = VerifyReport()
    objects: dict[str, ObjectInfo] = {}
    for info in ctx.store.list_keys(BLOB_PREFIX):
        sha = sha256_from_key(info.key)
        if sha is not None:
            objects[sha] = info
    with session_scope(ctx.engine) as s:
        committed = refs.committed_refs().subquery()
        rows = s.execute(
            sa.select(committed.c.sha256, col(Blob.state), col(Blob.size_bytes)).outerjoin(
                Blob, col(Blob.sha256) == committed.c.sha256
            )
        ).all()
        bad_sizes = s.execute(
            sa.select(
                col(CheckpointFile.checkpoint_id),
                col(CheckpointFile.path),
                col(CheckpointFile.size_bytes),
                col(Blob.size_bytes),
            )
            .join(Blob, col(Blob.sha256) == col(CheckpointFile.sha256))
            .where(col(CheckpointFile.size_bytes) != col(Blob.size_bytes))
        ).all()
        ledger = s.execute(
            sa.select(col(Checkpoint.id), col(Checkpoint.state), col(UsageEvent.event), sa.func.count())
            .outerjoin(UsageEvent, col(UsageEvent.checkpoint_id) == col(Checkpoint.id))
            .group_by(col(Checkpoint.id), col(Checkpoint.state), col(UsageEvent.event))
        ).all()
        live = {r[0] for r in s.execute(sa.select(refs.all_refs().subquery().c.sha256)).all()}
        blob_rows = {r[0]: r[1] for r in s.execute(sa.select(col(Blob.sha256), col(Blob.state))).all()}
        open_uploads = {
            r[0] for r in s.execute(sa.select(col(Upload.id)).where(col(Upload.state) == UploadState.open.value)).all()
        }
    rep.stats = {"referenced_blobs": len(rows), "blob_rows": len(blob_rows), "objects": len(objects)}
    for sha, state, size in rows:
        obj = objects.get(sha)
        if state != BlobState.live.value:  # one statement read both: no race to re-check
            rep.findings.append(Finding("referenced_blob_not_live", sha, f"blob row is {state or 'missing'}"))
        if obj is None:
            obj = _recheck_missing(ctx, rep, sha, "referenced blob has no object in the store")
            if obj is not None:
                objects[sha] = obj
        if obj is not None and size is not None and obj.size != size:
            rep.findings.append(Finding("size_mismatch", sha, f"object has {obj.size} bytes, row says {size}"))
    for ckpt_id, path, fsize, bsize in bad_sizes:
        rep.findings.append(Finding("size_mismatch", f"{ckpt_id}/{path}", f"manifest says {fsize}, blob {bsize}"))
    if hash_sample:
        present = sorted(sha for sha, state, _ in rows if sha in objects and state == BlobState.live.value)
        sample = random.Random(seed).sample(present, min(hash_sample, len(present)))
        hashed = 0
        for sha in sample:
            hooks.verify_before_hash(sha)
            try:
                digest, _ = ctx.store.hash_object(blob_key(sha))
            except NotFound:  # deleted since the listing: collected meanwhile, or really lost
                _recheck_missing(ctx, rep, sha, "referenced blob vanished from the store during verify")
                continue
            hashed += 1
            if digest != sha:
                rep.findings.append(Finding("hash_mismatch", sha, f"object hashes to {digest}"))
        rep.stats["hashed"] = hashed
    counts: dict[str, dict[str, int]] = {}
    states: dict[str, str] = {}
    for ckpt_id, state, event, n in ledger:
        states[ckpt_id] = state
        if event is not None:
            counts.setdefault(ckpt_id, {})[event] = int(n)
    for ckpt_id, state in states.items():
        c = counts.get(ckpt_id, {})
        commits = c.get(UsageEventKind.commit, 0)
        ends = c.get(UsageEventKind.end, 0)
        restores = c.get(UsageEventKind.restore, 0)
        ends_expected = restores + (0 if state == CheckpointState.committed.value else 1)
        if commits != 1 or ends != ends_expected:
            rep.findings.append(
                Finding(
                    "ledger_inconsistent",
                    ckpt_id,
                    f"state {state}: commit={commits} end={ends} restore={restores}",
                )
            )
    if expect_collected:
        for sha in sorted(set(blob_rows) - live):
            rep.findings.append(Finding("garbage_blob_row", sha, f"unreferenced blob row ({blob_rows[sha]})", "warning"))
        for sha in sorted(set(objects) - set(blob_rows)):
            rep.findings.append(Finding("garbage_object", blob_key(sha), "object without a blob row", "warning"))
        for info in ctx.store.list_keys(STAGING_PREFIX):
            uid = info.key[len(STAGING_PREFIX) :].split("/")[0]
            if uid not in open_uploads:
                rep.findings.append(Finding("garbage_staging", info.key, "staging object of a closed upload", "warning"))
    return rep
