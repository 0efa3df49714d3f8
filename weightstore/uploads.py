"""The upload protocol: declare → transfer (dedup / stream / presigned) → commit.

Write order (docs/design.md, rule S2): object durable and sha256 verified → blob row ``live`` →
checkpoint manifest committed, in one transaction that re-checks every blob is still live.

Transfer modes:
- ``present``: the caller's tenant already holds these bytes (``tenant_blob``); nothing moves.
- ``stream``: the bytes go through the service (``BlobWriter``): up to ``single_put_max_bytes`` piped
  into one PUT carrying the declared SHA-256, which the store checks; larger files hashed on the
  way and sent in parts, completed only if the hash matches. Either way a wrong byte never lands at
  a content-addressed key.
- ``presigned``, files up to ``single_put_max_bytes`` (5 GiB): one PUT straight to the
  blob key. The signature covers the SHA-256 checksum (the store refuses other bytes) and the
  upload id as object metadata; commit reads both back with one HEAD: no copy, no re-read. Every
  tenant that does not hold the bytes gets such a URL whether or not the blob exists elsewhere,
  and must have written the object itself (metadata names one of its uploads), so the answer
  never reveals, and a commit never borrows, another tenant's blob.
- ``presigned``, larger files: multipart to a *staging* key; commit completes it, re-hashes it
  (multipart objects carry no whole-file SHA-256) and copies it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, select

from weightstore import audit, formats, ledger, runs
from weightstore.auth import Principal
from weightstore.checkpoints import check_ttl, end_checkpoint, expires_at_for
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import (
    AlreadyExists,
    CatalogBusy,
    IntegrityError,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
    UploadExpired,
    UploadIncomplete,
)
from weightstore.models import (
    Blob,
    BlobState,
    Checkpoint,
    CheckpointFile,
    CheckpointState,
    Tenant,
    TenantBlob,
    TrainingRun,
    Upload,
    UploadFile,
    UploadState,
)
from weightstore.names import TinkerPath, check_file_path, check_name, check_sha256, new_id
from weightstore.objectstore import ObjectStore, blob_key, staging_key
from weightstore.settings import Settings

log = logging.getLogger(__name__)

MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
MIN_PART = 5 * 1024 * 1024  # S3's minimum part size (except the last)
USER_KINDS = {"training", "sampler"}  # kinds a trainer may upload; the others are made by exports
WRITER_META = "weightstore-upload"  # object metadata: the upload whose presigned PUT wrote the blob


@dataclass(frozen=True)
class DeclaredFile:
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class UploadRequest:
    run_id: str
    kind: str
    name: str
    files: list[DeclaredFile]
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    transfer: str = "stream"
    """Preferred transfer for bytes the tenant does not hold yet: ``stream`` or ``presigned``."""


@dataclass
class FileAnswer:
    path: str
    size_bytes: int
    sha256: str
    transfer: str
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    part_size: int | None = None
    part_urls: list[str] = field(default_factory=list)


@dataclass
class UploadAnswer:
    upload_id: str
    expires_at: datetime
    tinker_path: str
    files: list[FileAnswer]

    @property
    def bytes_to_send(self) -> int:
        return sum(f.size_bytes for f in self.files if f.transfer != "present")


def part_size_for(size: int, preferred: int) -> int:
    """A part size that keeps every upload within S3's 10,000-part limit."""
    return max(preferred, MIN_PART, math.ceil(size / MAX_PARTS))


def _check_metadata(meta: dict[str, str] | None) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidRequest("user_metadata must map strings to strings")
    if len(meta) > 64 or sum(len(k) + len(v) for k, v in meta.items()) > 16_384:
        raise InvalidRequest("user_metadata is too large (max 64 entries, 16 KiB)")


def _default_ttl(session: Session, tenant_id: str, kind: str) -> int | None:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        return None
    return tenant.default_ttl_training_seconds if kind == "training" else tenant.default_ttl_sampler_seconds


def validate_request(ctx: Context, req: UploadRequest, *, internal: bool = False) -> None:
    s = ctx.settings
    if req.kind not in USER_KINDS and not internal:
        raise InvalidRequest(f"kind must be one of {sorted(USER_KINDS)}")
    check_name(req.name, max_length=s.name_max_length)
    if req.overwrite and req.kind != "training":
        raise InvalidRequest("overwrite is only allowed for full-state (training) checkpoints, as in Tinker")
    if req.transfer not in {"stream", "presigned"}:
        raise InvalidRequest("transfer must be 'stream' or 'presigned'")
    check_ttl(s, req.ttl_seconds)
    _check_metadata(req.user_metadata)
    if not req.files:
        raise InvalidRequest("a checkpoint needs at least one file")
    if len(req.files) > s.max_files_per_checkpoint:
        raise InvalidRequest(f"at most {s.max_files_per_checkpoint} files per checkpoint")
    for f in req.files:
        check_file_path(f.path)
        check_sha256(f.sha256)
        if isinstance(f.size_bytes, bool) or not isinstance(f.size_bytes, int) or not 0 <= f.size_bytes <= s.max_file_bytes:
            raise InvalidRequest(f"{f.path}: size must be 0..{s.max_file_bytes} bytes")
    formats.check_file_set(req.kind, [f.path for f in req.files])


def _existing_live(session: Session, run_id: str, kind: str, name: str) -> Checkpoint | None:
    return session.exec(
        select(Checkpoint).where(
            Checkpoint.run_id == run_id,
            Checkpoint.kind == kind,
            Checkpoint.name == name,
            Checkpoint.state == CheckpointState.committed,
        )
    ).first()


def declare(ctx: Context, principal: Principal, req: UploadRequest, *, internal: bool = False) -> UploadAnswer:
    """Step 1+2: record the upload and answer, per file, how (and whether) to send its bytes."""
    principal.require_write()
    validate_request(ctx, req, internal=internal)
    now = ctx.clock.now()
    s = ctx.settings
    upload_id = new_id("upl")
    answers: list[FileAnswer] = []
    with session_scope(ctx.engine) as session:
        run = runs.get_run(session, principal, req.run_id)
        if not run.trainable and not internal:
            raise InvalidRequest(f"run {run.id} was created by copy_weights and cannot be written to")
        if not req.overwrite and _existing_live(session, req.run_id, req.kind, req.name) is not None:
            path = TinkerPath(req.run_id, req.kind, req.name)
            raise AlreadyExists(f"{path} already exists (overwrite=true replaces a full-state checkpoint)")
        ttl = req.ttl_seconds if req.ttl_seconds is not None else _default_ttl(session, principal.tenant_id, req.kind)
        owned = set(
            session.exec(
                select(TenantBlob.sha256)
                .join(Blob, Blob.sha256 == TenantBlob.sha256)
                .where(  # type: ignore[arg-type]
                    TenantBlob.tenant_id == principal.tenant_id,
                    TenantBlob.sha256.in_([f.sha256 for f in req.files]),  # type: ignore[attr-defined]
                    Blob.state == BlobState.live,
                )
            ).all()
        )
        upload = Upload(
            id=upload_id,
            tenant_id=principal.tenant_id,
            run_id=req.run_id,
            kind=req.kind,
            name=req.name,
            overwrite=req.overwrite,
            ttl_seconds=ttl,
            user_metadata=req.user_metadata,
            created_at=now,
            expires_at=now + timedelta(seconds=s.upload_expiry_seconds),
        )
        session.add(upload)
        session.flush()
        for i, f in enumerate(req.files):
            ans = FileAnswer(f.path, f.size_bytes, f.sha256, "present" if f.sha256 in owned else req.transfer)
            row = UploadFile(
                upload_id=upload_id,
                path=f.path,
                size_bytes=f.size_bytes,
                sha256=f.sha256,
                transfer=ans.transfer,
                received=ans.transfer == "present",
            )
            if ans.transfer == "stream":
                ans.url = f"/v1/uploads/{upload_id}/files/{f.path}"
            elif ans.transfer == "presigned" and direct_put(s, f.size_bytes):
                ans.url, ans.headers = ctx.store.presign_put(
                    blob_key(f.sha256), s.presign_ttl_seconds, sha256=f.sha256, metadata={WRITER_META: upload_id}
                )
            elif ans.transfer == "presigned":
                row.staging_key = staging_key(upload_id, i)
                _presign(ctx.store, s.presign_ttl_seconds, row, ans, s.multipart_threshold_bytes, s.part_size_bytes)
            session.add(row)
            answers.append(ans)
        # The upload holds its blobs against the collector from now on (mark reads open uploads
        # first); touching them restarts their grace period.
        session.execute(
            sa.update(Blob)
            .where(Blob.sha256.in_([f.sha256 for f in req.files]))  # type: ignore[attr-defined]
            .values(last_referenced_at=now)
        )
        audit.record(
            session,
            at=now,
            action="upload.declare",
            tenant_id=principal.tenant_id,
            key_id=principal.key_id,
            target=str(TinkerPath(req.run_id, req.kind, req.name)),
            upload_id=upload_id,
            files=len(req.files),
            bytes_to_send=sum(a.size_bytes for a in answers if a.transfer != "present"),
        )
    return UploadAnswer(upload_id, upload.expires_at, str(TinkerPath(req.run_id, req.kind, req.name)), answers)


def single_put_limit(s: Settings) -> int:
    """Largest file written as one PUT whose SHA-256 the store checks (presigned straight to the blob
    key, or piped by the stream endpoint); -1 when the store does not enforce checksums."""
    return s.single_put_max_bytes if s.s3_verifies_checksums else -1


def direct_put(s: Settings, size: int) -> bool:
    """A presigned file goes as one checksummed PUT to its blob key (else: staging, see module doc)."""
    return size <= single_put_limit(s)


def _presign(store: ObjectStore, ttl: int, row: UploadFile, ans: FileAnswer, threshold: int, part: int) -> None:
    assert row.staging_key
    if row.size_bytes < threshold:
        ans.url, ans.headers = store.presign_put(row.staging_key, ttl, sha256=row.sha256)
        return
    psize = part_size_for(row.size_bytes, part)
    row.multipart_upload_id = store.create_multipart(row.staging_key)
    ans.part_size = psize
    ans.part_urls = [
        store.presign_part(row.staging_key, row.multipart_upload_id, n + 1, ttl) for n in range(math.ceil(row.size_bytes / psize))
    ]


def _load_open_upload(session: Session, principal: Principal, upload_id: str, now: datetime) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.tenant_id != principal.tenant_id:
        raise NotFound(f"upload {upload_id} not found")
    if upload.state != UploadState.open:
        raise UploadExpired(f"upload {upload_id} is {upload.state}")
    if upload.expires_at <= now:
        raise UploadExpired(f"upload {upload_id} expired at {upload.expires_at.isoformat()}")
    return upload


class _Pipe:
    """A bounded queue that a PUT running on another thread reads as its request body."""

    def __init__(self, depth: int) -> None:
        self.q: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)

    def read(self, n: int = -1) -> bytes:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item or b""

    def fail(self) -> None:
        """Make the reader raise (the PUT is cut off before its Content-Length: nothing is stored)."""
        while True:
            try:
                self.q.put_nowait(InterruptedError("upload aborted"))
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.q.get_nowait()


class BlobWriter:
    """Receives one file's bytes in order and writes them to their blob key.

    The object only becomes visible once size and sha256 match the declaration; otherwise nothing
    is left behind. Three ways, by size:
    - small files: hashed, then one PUT with the SHA-256 checksum;
    - up to ``single_put_max`` (stores that verify checksums): piped as they arrive into one PUT
      carrying the declared SHA-256, which the store checks before the object appears (a short or
      failed body cuts the PUT off) — no hashing here, no parts;
    - otherwise: hashed, sent as multipart parts, completed only if the hash matches.
    When the blob already exists, the bytes are only hashed (the tenant proves it holds them).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        sha256: str,
        size: int,
        exists: bool,
        part_size: int,
        threshold: int,
        max_inflight: int = 3,
        single_put_max: int = 0,
    ) -> None:
        self.store, self.sha256, self.size, self.exists = store, sha256, size, exists
        self.key = blob_key(sha256)
        self.hash = hashlib.sha256()
        self.received = 0
        self.part_size = part_size_for(size, part_size)
        self.piped = not exists and threshold <= size <= single_put_max
        self.multipart = not exists and size >= threshold and not self.piped
        self.pending: list[memoryview] = []
        self.pending_len = 0
        self.parts: list[Future[str]] = []
        self.pool: ThreadPoolExecutor | None = None
        self.mpu_id: str | None = None
        self.max_inflight = max_inflight
        self.pipe: _Pipe | None = None
        self.put: Future[None] | None = None
        if self.multipart:
            self.mpu_id = store.create_multipart(self.key)
            self.pool = ThreadPoolExecutor(max_workers=max_inflight)
        elif self.piped:
            self.pipe = _Pipe(depth=max_inflight)
            self.pool = ThreadPoolExecutor(max_workers=1)
            self.put = self.pool.submit(store.put_stream, self.key, self.pipe, size, sha256=sha256)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)
        if self.received > self.size:
            self.abort()
            raise IntegrityError(f"received more than the declared {self.size} bytes")
        if self.piped:
            return self._feed(bytes(data))
        self.hash.update(data)
        if self.exists:
            return
        # Keep references, not copies: a part is joined once, when it is complete.
        self.pending.append(memoryview(data))
        self.pending_len += len(data)
        if self.multipart:
            while self.pending_len >= self.part_size:
                self._send_part(self._take(self.part_size))

    def _take(self, n: int) -> bytes:
        out: list[memoryview] = []
        need = n
        while need and self.pending:
            head = self.pending[0]
            if len(head) <= need:
                out.append(self.pending.pop(0))
                need -= len(head)
            else:
                out.append(head[:need])
                self.pending[0] = head[need:]
                need = 0
        self.pending_len -= n - need
        return b"".join(out)

    def _send_part(self, chunk: bytes) -> None:
        assert self.pool and self.mpu_id
        # Bounded memory: wait for the oldest part when too many are in flight.
        inflight = [p for p in self.parts if not p.done()]
        if len(inflight) >= self.max_inflight:
            inflight[0].result()
        self.parts.append(self.pool.submit(self.store.upload_part, self.key, self.mpu_id, len(self.parts) + 1, chunk))

    def _feed(self, data: bytes | None) -> None:
        assert self.pipe and self.put
        while True:  # bounded memory: wait while the PUT is behind, but notice when it died
            if self.put.done():
                self.put.result()
                raise StoreUnavailable(f"put {self.key}: the object store ended the upload early")
            try:
                self.pipe.q.put(data, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        if self.received != self.size:
            self.abort()
            raise IntegrityError(f"received {self.received} bytes, declared {self.size}")
        if self.piped:
            assert self.pipe and self.put
            try:
                self._feed(None)  # end of body; the store checks the SHA-256 before answering
                self.put.result()
            except IntegrityError as exc:
                raise IntegrityError(f"sha256 mismatch: the bytes received do not hash to the declared {self.sha256}") from exc
            finally:
                self._shutdown()
            return
        if self.hash.hexdigest() != self.sha256:
            self.abort()
            raise IntegrityError(f"sha256 mismatch: declared {self.sha256}, received {self.hash.hexdigest()}")
        if self.exists:
            return
        if not self.multipart:
            self.store.put_bytes(self.key, self._take(self.pending_len), sha256=self.sha256, if_absent=True)
            return
        if self.pending_len or not self.parts:
            self._send_part(self._take(self.pending_len))
        try:
            etags = [p.result() for p in self.parts]
        except BaseException:
            self.abort()
            raise
        parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
        self.store.complete_multipart(self.key, self.mpu_id or "", parts)
        self._shutdown()

    def abort(self) -> None:
        if self.pipe is not None and self.put is not None and not self.put.done():
            self.pipe.fail()
            with contextlib.suppress(Exception):
                self.put.result(timeout=30)
        if self.mpu_id:
            for p in self.parts:
                p.cancel()
            try:
                self.store.abort_multipart(self.key, self.mpu_id)
            except Exception:  # noqa: BLE001 - leftovers are garbage the collector's orphan phase aborts
                pass
            self.mpu_id = None
        self._shutdown()

    def _shutdown(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def open_stream(ctx: Context, principal: Principal, upload_id: str, path: str) -> BlobWriter:
    """Start receiving ``path`` of an open upload through the service."""
    principal.require_write()
    check_file_path(path)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        _load_open_upload(session, principal, upload_id, now)
        row = session.get(UploadFile, (upload_id, path))
        if row is None:
            raise NotFound(f"file {path} is not part of upload {upload_id}")
        blob = session.get(Blob, row.sha256)
        if blob is not None and blob.state == BlobState.deleting:
            raise CatalogBusy("these bytes are being garbage-collected right now; retry in a minute")
        exists = blob is not None and blob.state == BlobState.live
    s = ctx.settings
    return BlobWriter(
        ctx.store,
        sha256=row.sha256,
        size=row.size_bytes,
        exists=exists,
        part_size=s.part_size_bytes,
        threshold=s.multipart_threshold_bytes,
        single_put_max=single_put_limit(s),
    )


def finish_stream(ctx: Context, principal: Principal, upload_id: str, path: str, writer: BlobWriter) -> None:
    writer.finish()
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        row = session.get(UploadFile, (upload_id, path))
        if row is None:
            raise NotFound(f"file {path} is not part of upload {upload_id}")
        if writer.exists and session.get(Blob, row.sha256) is None and ctx.store.head(writer.key) is None:
            # The bytes were only hashed (the blob existed) and the collector reclaimed it meanwhile:
            # nothing durable holds them, so the client must send them again.
            raise CatalogBusy("these bytes were garbage-collected while being received; send them again")
        mark_live(session, row.sha256, row.size_bytes, now)
        row.received = True
        session.add(row)


def receive_bytes(ctx: Context, principal: Principal, upload_id: str, path: str, data: bytes) -> None:
    """Convenience for small files and tests: the whole body at once."""
    writer = open_stream(ctx, principal, upload_id, path)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    finish_stream(ctx, principal, upload_id, path, writer)


def mark_live(session: Session, sha256: str, size: int, now: datetime) -> None:
    """Insert the blob row as live (object verified and durable), or refresh an existing one."""
    blob = session.get(Blob, sha256)
    if blob is None:
        session.add(
            Blob(sha256=sha256, size_bytes=size, state=BlobState.live, created_at=now, verified_at=now, last_referenced_at=now)
        )
    elif blob.state == BlobState.deleting:
        raise CatalogBusy("these bytes are being garbage-collected right now; retry in a minute")
    else:
        blob.state, blob.verified_at, blob.last_referenced_at = BlobState.live, blob.verified_at or now, now
        session.add(blob)


def _finalize_direct(ctx: Context, row: UploadFile, tenant_id: str) -> None:
    """Check a presigned single PUT at its blob key: one HEAD, no read-back (module doc)."""
    store = ctx.store
    final = blob_key(row.sha256)
    info = store.head(final, checksum=True)
    writer = info.metadata.get(WRITER_META) if info is not None else None
    if info is None or writer is None:
        raise UploadIncomplete(f"{row.path}: not uploaded yet", files=[row.path])
    if writer != row.upload_id:
        # Another upload PUT the same bytes after ours. Fine if it was this tenant's (e.g. a state
        # and a sampler save of one step in parallel); otherwise nothing proves we sent them.
        with session_scope(ctx.engine) as session:
            other = session.get(Upload, writer)
            if other is None or other.tenant_id != tenant_id:
                raise UploadIncomplete(
                    f"{row.path}: not uploaded yet (or overwritten by another upload of the same bytes): send it again",
                    files=[row.path],
                )
    if info.size == row.size_bytes and info.stored_sha256_is(row.sha256):
        return
    # The store kept no checksum (or a different one): it did not enforce the signed one, so check
    # the bytes. A mismatch means s3_verifies_checksums is wrong for this store.
    if info.size != row.size_bytes or store.hash_object(final)[0] != row.sha256:
        log.error(
            "object store accepted a presigned PUT whose bytes differ from the signed checksum: %s "
            "(set WEIGHTSTORE_S3_VERIFIES_CHECKSUMS=false for this store)",
            final,
        )
        raise IntegrityError(f"{row.path}: stored bytes do not match sha256 {row.sha256}", file=row.path)


def _finalize_presigned(ctx: Context, row: UploadFile, tenant_id: str) -> None:
    """Verify a presigned transfer (at its blob key, or at its staging key, then moved into place)."""
    if row.staging_key is None:
        return _finalize_direct(ctx, row, tenant_id)
    store = ctx.store
    key = row.staging_key
    if row.multipart_upload_id:
        parts = store.list_parts(key, row.multipart_upload_id)
        if sum(p["Size"] for p in parts) != row.size_bytes:
            raise UploadIncomplete(
                f"{row.path}: {sum(p['Size'] for p in parts)} of {row.size_bytes} bytes uploaded", files=[row.path]
            )
        store.complete_multipart(key, row.multipart_upload_id, parts)
    info = store.head(key, checksum=True)
    if info is None:
        raise UploadIncomplete(f"{row.path}: not uploaded yet", files=[row.path])
    if info.size != row.size_bytes:
        store.delete(key)
        raise IntegrityError(f"{row.path}: {info.size} bytes stored, {row.size_bytes} declared", file=row.path)
    if not (info.stored_sha256_is(row.sha256) and not row.multipart_upload_id and ctx.settings.s3_verifies_checksums):
        # Multipart objects carry a composite checksum, not the whole-file sha256: read it back.
        digest, _ = store.hash_object(key)
        if digest != row.sha256:
            store.delete(key)
            raise IntegrityError(f"{row.path}: sha256 mismatch: declared {row.sha256}, stored {digest}", file=row.path)
    final = blob_key(row.sha256)
    if store.head(final) is None:
        store.copy(key, final, row.size_bytes)
    store.delete(key)


def add_manifest(
    session: Session, ckpt: Checkpoint, files: list[tuple[str, int, str]], blobs: dict[str, Blob], *, now: datetime
) -> None:
    """Write a new checkpoint's manifest: one row per (path, size, sha256), the tenant's proof of
    holding each blob (for later dedup), and a touch on every blob. ``blobs`` must be the caller's
    locked, verified-live rows for every sha256 in ``files``."""
    for path, size, sha in files:
        session.add(CheckpointFile(checkpoint_id=ckpt.id, path=path, size_bytes=size, sha256=sha))
    shas = sorted({sha for _, _, sha in files})
    owned = set(
        session.exec(select(TenantBlob.sha256).where(TenantBlob.tenant_id == ckpt.tenant_id, TenantBlob.sha256.in_(shas))).all()
    )  # type: ignore[attr-defined]
    for sha in shas:
        if sha not in owned:
            session.add(TenantBlob(tenant_id=ckpt.tenant_id, sha256=sha, created_at=now))
        blobs[sha].last_referenced_at = now
        session.add(blobs[sha])


@dataclass(frozen=True)
class CommitResult:
    checkpoint: Checkpoint
    tinker_path: str
    bytes_received: int


def commit(
    ctx: Context,
    principal: Principal,
    upload_id: str,
    *,
    request_id: str | None = None,
    on_validated: Callable[[Session, Checkpoint], None] | None = None,
) -> CommitResult:
    """Step 3: verify every file, validate formats, then commit the checkpoint atomically."""
    principal.require_write()
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        upload = _load_open_upload(session, principal, upload_id, now)
        rows = list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())
    # Object-store work happens outside any transaction (it can take minutes).
    missing = [r.path for r in rows if r.transfer == "stream" and not r.received]
    if missing:
        raise UploadIncomplete(f"files not received yet: {', '.join(missing)}", files=missing)
    received = 0
    for row in rows:
        if row.transfer == "presigned" and not row.received:
            _finalize_presigned(ctx, row, principal.tenant_id)
            received += row.size_bytes
            with session_scope(ctx.engine) as session:
                mark_live(session, row.sha256, row.size_bytes, ctx.clock.now())
                db_row = session.get(UploadFile, (row.upload_id, row.path))
                assert db_row is not None
                db_row.received = True
                session.add(db_row)
        elif row.transfer == "stream":
            received += row.size_bytes
    s = ctx.settings
    for row in rows:
        key = blob_key(row.sha256)
        formats.validate_file(
            row.path,
            row.size_bytes,
            lambda a, n, k=key: ctx.store.read_range(k, a, n),
            max_header=s.max_safetensors_header_bytes,
            max_json=s.max_json_file_bytes,
        )

    now = ctx.clock.now()
    try:
        with session_scope(ctx.engine) as session:
            upload = _load_open_upload(session, principal, upload_id, now)
            run = session.get(TrainingRun, upload.run_id)
            if run is None or run.tenant_id != principal.tenant_id:
                raise NotFound(f"training run {upload.run_id!r} not found")
            shas = sorted({r.sha256 for r in rows})
            blob_q = select(Blob).where(Blob.sha256.in_(shas))  # type: ignore[attr-defined]
            if session.get_bind().dialect.name == "postgresql":
                blob_q = blob_q.with_for_update()  # the collector's tombstone takes the same row locks
            blobs = {b.sha256: b for b in session.exec(blob_q).all()}
            not_live = [r.path for r in rows if (b := blobs.get(r.sha256)) is None or b.state != BlobState.live]
            if not_live:
                # A dedup hit that the collector reclaimed meanwhile: the client must send the bytes.
                for r in rows:
                    if r.path in not_live:
                        db_row = session.get(UploadFile, (r.upload_id, r.path))
                        if db_row is not None:
                            db_row.transfer, db_row.received = "stream", False
                            session.add(db_row)
                session.commit()
                raise UploadIncomplete(f"files must be sent again: {', '.join(not_live)}", files=not_live)
            old = _existing_live(session, upload.run_id, upload.kind, upload.name)
            if old is not None:
                if not upload.overwrite:
                    raise AlreadyExists(f"{TinkerPath(upload.run_id, upload.kind, upload.name)} already exists")
                end_checkpoint(session, old, state=CheckpointState.deleted, at=now, now=now)
                session.flush()
            ckpt = Checkpoint(
                id=new_id("ckpt"),
                tenant_id=principal.tenant_id,
                run_id=upload.run_id,
                kind=upload.kind,
                name=upload.name,
                size_bytes=sum(r.size_bytes for r in rows),
                created_at=now,
                expires_at=expires_at_for(now, upload.ttl_seconds),
                user_metadata=upload.user_metadata,
            )
            session.add(ckpt)
            session.flush()
            add_manifest(session, ckpt, [(r.path, r.size_bytes, r.sha256) for r in rows], blobs, now=now)
            upload.state, upload.checkpoint_id = UploadState.committed, ckpt.id
            session.add(upload)
            runs.touch(session, run, now)
            ledger.on_commit(session, ckpt, now=now)
            if on_validated is not None:
                on_validated(session, ckpt)
            audit.record(
                session,
                at=now,
                action="checkpoint.commit",
                tenant_id=principal.tenant_id,
                key_id=principal.key_id,
                target=str(TinkerPath(ckpt.run_id, ckpt.kind, ckpt.name)),
                request_id=request_id,
                upload_id=upload_id,
                size_bytes=ckpt.size_bytes,
            )
            session.flush()
    except DBIntegrityError as exc:
        # Two committers raced for the same name: the partial unique index picked the winner.
        raise AlreadyExists(f"{TinkerPath(upload.run_id, upload.kind, upload.name)} already exists") from exc
    return CommitResult(ckpt, str(TinkerPath(ckpt.run_id, ckpt.kind, ckpt.name)), received)


def abort(ctx: Context, principal: Principal, upload_id: str) -> None:
    principal.require_write()
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        upload = _load_open_upload(session, principal, upload_id, now)
        upload.state = UploadState.aborted
        session.add(upload)
        rows = list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())
    for r in rows:
        if r.multipart_upload_id and r.staging_key:
            ctx.store.abort_multipart(r.staging_key, r.multipart_upload_id)


def get_upload(ctx: Context, principal: Principal, upload_id: str) -> tuple[Upload, list[UploadFile]]:
    with session_scope(ctx.engine) as session:
        upload = session.get(Upload, upload_id)
        if upload is None or upload.tenant_id != principal.tenant_id:
            raise NotFound(f"upload {upload_id} not found")
        return upload, list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())


__all__ = [
    "BlobWriter",
    "CommitResult",
    "DeclaredFile",
    "FileAnswer",
    "UploadAnswer",
    "UploadRequest",
    "abort",
    "commit",
    "declare",
    "finish_stream",
    "get_upload",
    "open_stream",
    "receive_bytes",
]
