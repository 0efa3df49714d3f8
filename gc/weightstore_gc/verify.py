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
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import sqlalchemy as sa

from weightstore.blobs import refs
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.models import Blob, BlobState, Checkpoint, CheckpointFile, CheckpointState, Upload, UploadState, UsageEvent
from weightstore.objectstore import BLOB_PREFIX, STAGING_PREFIX, blob_key, sha256_from_key

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


def verify(ctx: Context, *, hash_sample: int = 0, expect_collected: bool = False, seed: int | None = None) -> VerifyReport:
    rep = VerifyReport()
    objects = {}
    for info in ctx.store.list_keys(BLOB_PREFIX):
        sha = sha256_from_key(info.key)
        if sha is not None:
            objects[sha] = info
    with session_scope(ctx.engine) as s:
        committed = refs.committed_refs().subquery()
        rows = s.execute(
            sa.select(committed.c.sha256, Blob.state, Blob.size_bytes).outerjoin(Blob, Blob.sha256 == committed.c.sha256)
        ).all()  # type: ignore[arg-type]
        bad_sizes = s.execute(
            sa.select(
                CheckpointFile.checkpoint_id,
                CheckpointFile.path,
                CheckpointFile.size_bytes,  # type: ignore[call-overload]
                Blob.size_bytes,
            )
            .join(Blob, Blob.sha256 == CheckpointFile.sha256)
            .where(CheckpointFile.size_bytes != Blob.size_bytes)
        ).all()
        ledger = s.execute(
            sa.select(Checkpoint.id, Checkpoint.state, UsageEvent.event, sa.func.count())  # type: ignore[call-overload]
            .outerjoin(UsageEvent, UsageEvent.checkpoint_id == Checkpoint.id)
            .group_by(Checkpoint.id, Checkpoint.state, UsageEvent.event)
        ).all()
        live = {r[0] for r in s.execute(sa.select(refs.all_refs().subquery().c.sha256)).all()}
        blob_rows = {r[0]: r[1] for r in s.execute(sa.select(Blob.sha256, Blob.state)).all()}  # type: ignore[call-overload]
        open_uploads = {
            r[0]
            for r in s.execute(
                sa.select(Upload.id).where(  # type: ignore[call-overload]
                    Upload.state == UploadState.open.value
                )
            ).all()
        }
    rep.stats = {"referenced_blobs": len(rows), "blob_rows": len(blob_rows), "objects": len(objects)}
    for sha, state, size in rows:
        info = objects.get(sha)
        if state != BlobState.live.value:
            rep.findings.append(Finding("referenced_blob_not_live", sha, f"blob row is {state or 'missing'}"))
        if info is None:
            rep.findings.append(Finding("missing_object", sha, "referenced blob has no object in the store"))
        elif size is not None and info.size != size:
            rep.findings.append(Finding("size_mismatch", sha, f"object has {info.size} bytes, row says {size}"))
    for ckpt_id, path, fsize, bsize in bad_sizes:
        rep.findings.append(Finding("size_mismatch", f"{ckpt_id}/{path}", f"manifest says {fsize}, blob {bsize}"))
    if hash_sample:
        present = sorted(sha for sha, state, _ in rows if sha in objects and state == BlobState.live.value)
        sample = random.Random(seed).sample(present, min(hash_sample, len(present)))
        for sha in sample:
            digest, _ = ctx.store.hash_object(blob_key(sha))
            if digest != sha:
                rep.findings.append(Finding("hash_mismatch", sha, f"object hashes to {digest}"))
        rep.stats["hashed"] = len(sample)
    counts: dict[str, dict[str, int]] = {}
    states: dict[str, str] = {}
    for ckpt_id, state, event, n in ledger:
        states[ckpt_id] = state
        if event is not None:
            counts.setdefault(ckpt_id, {})[event] = int(n)
    for ckpt_id, state in states.items():
        c = counts.get(ckpt_id, {})
        ends_expected = c.get("restore", 0) + (0 if state == CheckpointState.committed.value else 1)
        if c.get("commit", 0) != 1 or c.get("end", 0) != ends_expected:
            rep.findings.append(
                Finding(
                    "ledger_inconsistent",
                    ckpt_id,
                    f"state {state}: commit={c.get('commit', 0)} end={c.get('end', 0)} restore={c.get('restore', 0)}",
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
