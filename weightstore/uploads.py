"""The upload protocol: declare → transfer (dedup / stream / presigned) → commit (or abort).

Write order (docs/design.md, rule S2): object durable and sha256 verified (``blobs``) → blob row
``live`` (``blobs.mark_live``) → checkpoint manifest committed (``publish.add_checkpoint``), in one
transaction that re-checks every blob is still live (``blobs.lock_live``).

Transfer modes:
- ``present``: the caller's tenant already holds these bytes (``tenant_blob``); nothing moves.
- ``stream``: the bytes go through the service (``blobs.BlobWriter``): up to ``single_put_max_bytes``
  piped into one PUT carrying the declared SHA-256, which the store checks; larger files hashed on
  the way and sent in parts, completed only if the hash matches. Either way a wrong byte never
  lands at a content-addressed key.
- ``presigned``, files up to ``single_put_max_bytes`` (5 GiB): one PUT straight to the
  blob key. The signature covers the SHA-256 checksum (the store refuses other bytes) and the
  upload id as object metadata; commit reads both back with one HEAD: no copy, no re-read. Every
  tenant that does not hold the bytes gets such a URL whether or not the blob exists elsewhere,
  and must have written the object itself (metadata names one of its uploads), so the answer
  never reveals, and a commit never borrows, another tenant's blob.
- ``presigned``, larger files: multipart to a *staging* key; commit completes it, re-hashes it
  (multipart objects carry no whole-file SHA-256; the chunk digests of issue 14 are hashed in the
  same read and recorded with the blob row) and copies it into place. Part URLs are signed
  lazily: the declare answer holds at most ``presign_parts_batch`` of them in total, ``transfer``
  pages out the rest; part sizes follow S3's real limits (``objectstore.multipart_plan``).
- a commit that cannot prove a direct PUT (object absent, or its writer metadata names another
  tenant's upload: a concurrent identical save overwrote it) answers ``upload_incomplete`` the same
  way in both cases and turns the file into a single PUT to this upload's own staging key
  (``staging/<upload>/p-<hash of path>``), which no other tenant can write. ``transfer`` hands out
  that URL; the next commit HEADs the staging object (the store verified its signed checksum: the
  tenant sent these bytes), keeps the blob key when it already holds them, else copies the staging
  object into place. So a correct, fully sent save never fails because someone else wrote the same
  content at the same time.

Leases (issue 13, found 4): an open upload pins its blobs against the collector, so it must not
outlive its client. ``expires_at`` is a lease of ``upload_lease_seconds`` (10 min), renewed by the
client while it sends (``renew``; every ``transfer`` page and ``commit`` renews too), never past
``created_at + upload_expiry_seconds``. A client that dies stops renewing; the collector's orphans
phase closes the upload once the lease lapsed (``expired``) and its blobs are unpinned. A lapsed lease
is never revived: ``renew`` locks the row and refuses an upload past ``expires_at``, and the collector
closes only those, so the two never both win. All state is in the catalog: any replica renews,
commits or aborts an upload that another replica declared.

``commit`` is idempotent: committing an upload that is already committed answers the checkpoint it
made, so a client that lost the answer (a replica died after committing) may send it again.

``declare``, ``transfer``, ``open_stream``, ``finish_stream``, ``receive_bytes``, ``commit`` and ``abort`` are
workflows: object-store work happens between short transactions, never inside one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from weightstore import audit, blobs, checkpoints, formats, publish, retention, runs, tenants
from weightstore.auth import Principal
from weightstore.blobs import BlobWriter, single_put_limit
from weightstore.blobs import chunks as blob_chunks
from weightstore.blobs.chunks import ChunkDigests
from weightstore.context import Context
from weightstore.db import WRITE_LOCK, session_scope
from weightstore.errors import (
    AlreadyExists,
    CatalogBusy,
    IntegrityError,
    InvalidRequest,
    NotFound,
    TenantQuotaExceeded,
    UploadExpired,
    UploadIncomplete,
)
from weightstore.models import Blob, BlobState, Checkpoint, TenantBlob, TrainingRun, Upload, UploadFile, UploadState
from weightstore.names import TinkerPath, check_file_path, check_name, new_id
from weightstore.objectstore import blob_key, multipart_plan, staging_key
from weightstore.retention import check_ttl
from weightstore.settings import Settings

log = logging.getLogger(__name__)

USER_KINDS = {"training", "sampler", "files"}  # kinds a trainer may upload; the others are made by exports
OVERWRITABLE_KINDS = {"training", "files"}  # full state, and Hub folders (a Trainer re-pushes last-checkpoint/)
DECLARE_ATTEMPTS = 3  # a declare races the collector only when a reused blob is tombstoned meanwhile
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
    layout: str | None = None
    """``dcp``: a PyTorch Distributed Checkpoint whose files are added by its ranks (``add_files``)
    after the coordinator declared it, possibly with none; the full set is checked at commit.
    None: recognised from the declared names, which must then be complete (``formats.layout_of``)."""

    @property
    def tinker_path(self) -> TinkerPath:
        return TinkerPath(self.run_id, self.kind, self.name)


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
    """Presigned URLs of parts ``first_part ..`` (a page: ``transfer`` answers the others)."""
    part_count: int | None = None
    """How many parts the file has (multipart only); ``part_urls`` may hold fewer."""
    first_part: int = 1


@dataclass
class UploadAnswer:
    upload_id: str
    expires_at: datetime
    tinker_path: str
    files: list[FileAnswer]
    lease_seconds: int = 0
    """How long the upload stays open without a renewal (the client renews well before)."""

    @property
    def bytes_to_send(self) -> int:
        return sum(f.size_bytes for f in self.files if f.transfer != "present")


def validate_request(settings: Settings, req: UploadRequest) -> None:
    """Everything that can be checked without bytes or the catalog."""
    if req.kind not in USER_KINDS:
        raise InvalidRequest(f"kind must be one of {sorted(USER_KINDS)}")
    check_name(req.name, max_length=settings.name_max_length)
    if req.overwrite and req.kind not in OVERWRITABLE_KINDS:
        raise InvalidRequest("overwrite is only allowed for full-state (training) checkpoints, as in Tinker")
    if req.transfer not in {"stream", "presigned"}:
        raise InvalidRequest("transfer must be 'stream' or 'presigned'")
    check_ttl(settings, req.ttl_seconds)
    publish.check_user_metadata(req.user_metadata)
    for f in req.files:
        if isinstance(f.size_bytes, int) and f.size_bytes > settings.max_file_bytes:
            raise InvalidRequest(
                f"{f.path}: {f.size_bytes} bytes is more than the largest file this service stores "
                f"({settings.max_file_bytes} bytes, WEIGHTSTORE_MAX_FILE_BYTES; the object store's own limit is "
                "10,000 parts of at most 5 GiB)"
            )
    if req.layout is not None and req.layout not in formats.LAYOUTS:
        raise InvalidRequest(f"layout must be one of {', '.join(formats.LAYOUTS)}")
    publish.check_files(
        settings,
        req.kind,
        [(f.path, f.size_bytes, f.sha256) for f in req.files],
        layout=req.layout,
        complete=req.layout != "dcp",
    )
    total = sum(f.size_bytes for f in req.files)
    if total > settings.max_upload_bytes:
        raise InvalidRequest(f"an upload may declare at most {settings.max_upload_bytes} bytes in total ({total} declared)")


# --- declare ------------------------------------------------------------------------------------


Handover = Callable[[Session, list[str], bool], int]
"""Reservations the same tenant already holds elsewhere for bytes of a declare (the Hub's LFS carrier
uploads, ``hubwrite``): called with the sha256s the upload will need sent, it answers how many of
those bytes are already reserved, which the quota check does not count again; with ``take=True``
it also ends that reservation, so the bytes count once throughout (issue 15, part 2: a push that
fits is never refused). In the transaction that records the upload both calls come after the
tenant's row lock (``tenants.lock_quota``): a credit read before it could be taken over by a
concurrent declare meanwhile, and both would count the same reserved bytes as theirs."""


def declare(ctx: Context, principal: Principal, req: UploadRequest, *, handover: Handover | None = None) -> UploadAnswer:
    """Step 1+2: record the upload and answer, per file, how (and whether) to send its bytes.
    Workflow: check and read the catalog, presign (multipart uploads are started on the store),
    then record the upload in a second transaction. ``handover``: see ``Handover``."""
    principal.require_write()
    validate_request(ctx.settings, req)
    upload_id = new_id("upl")
    for _ in range(DECLARE_ATTEMPTS):
        with session_scope(ctx.engine) as session:
            ttl, owned = _check_declare(session, principal, req)
            credit = handover(session, [f.sha256 for f in req.files if f.sha256 not in owned], False) if handover else 0
            _check_quota(session, principal, req, now=ctx.clock.now(), lock=False, credit=credit)  # early: before presigning
        answers, rows = _answer_files(ctx, upload_id, req, owned)
        now = ctx.clock.now()
        try:
            with session_scope(ctx.engine) as session:
                # S2/S7 across the two transactions: a blob answered "present" in the first one may have
                # been tombstoned since. Re-read it under the collector's row locks before the upload's
                # rows make it referenced; if it is no longer live, answer again (it will be "send it").
                # Every declared row is locked, not only the reused ones: the upload then touches them all,
                # and two declares locking different subsets first would deadlock on PostgreSQL.
                _, not_live = blobs.lock_live(session, [r.sha256 for r in rows])
                if {r.sha256 for r in rows if r.transfer == "present"} & set(not_live):
                    continue
                # Again under the tenant's row lock (lock order: blobs, then tenant), taken before the
                # handover's credit is read: read earlier, a concurrent declare could take the same
                # carrier bytes over meanwhile and both would be credited for them (PostgreSQL).
                tenants.lock_quota(session, principal.tenant_id)
                to_send = [r.sha256 for r in rows if r.transfer != "present"]
                credit = handover(session, to_send, False) if handover else 0
                _check_quota(session, principal, req, now=now, lock=True, credit=credit)
                if handover:
                    handover(session, to_send, True)
                expires = lease_end(ctx.settings, created_at=now, now=now)
                upload = _record_upload(session, principal, req, upload_id, ttl, rows, now=now, expires_at=expires)
        except TenantQuotaExceeded:
            for r in rows:  # nothing was recorded: the multipart uploads started for it go too
                if r.multipart_upload_id and r.staging_key:
                    ctx.store.abort_multipart(r.staging_key, r.multipart_upload_id)
            raise
        return UploadAnswer(upload_id, upload.expires_at, str(req.tinker_path), answers, ctx.settings.upload_lease_seconds)
    raise CatalogBusy("the blobs this upload would reuse are being collected right now; retry shortly")


def _check_declare(session: Session, principal: Principal, req: UploadRequest) -> tuple[int | None, set[str]]:
    """Refuse a run that cannot be written or a name already taken; return the TTL to record and
    the sha256s this tenant holds (S4: dedup only against the tenant's own proven blobs)."""
    run = runs.get_run(session, principal, req.run_id)
    if not run.trainable:
        raise InvalidRequest(f"run {run.id} was created by copy_weights and cannot be written to")
    if not req.overwrite and publish.existing_committed(session, req.tinker_path) is not None:
        raise AlreadyExists(f"{req.tinker_path} already exists (overwrite=true replaces a full-state checkpoint)")
    ttl = req.ttl_seconds if req.ttl_seconds is not None else retention.tenant_default_ttl(session, principal.tenant_id, req.kind)
    return ttl, held_blobs(session, principal.tenant_id, [f.sha256 for f in req.files])


def held_blobs(session: Session, tenant_id: str, shas: list[str]) -> set[str]:
    """The sha256s among ``shas`` that ``tenant_id`` has proven it holds and that are live: the one
    possession rule behind every "already present" answer (S4; also the Hub's LFS batch)."""
    return set(
        session.exec(
            select(TenantBlob.sha256)
            .join(Blob, col(Blob.sha256) == col(TenantBlob.sha256))
            .where(
                TenantBlob.tenant_id == tenant_id,
                col(TenantBlob.sha256).in_(shas),
                Blob.state == BlobState.live,
            )
        ).all()
    )


def _check_quota(
    session: Session, principal: Principal, req: UploadRequest, *, now: datetime, lock: bool, credit: int = 0
) -> None:
    """The tenant's hard quota (``tenants.check_quota``) for this declare's logical bytes; an
    overwrite is credited with the visible checkpoint it replaces, and ``credit`` bytes are already
    reserved for it elsewhere (``Handover``)."""
    replaced = 0
    if req.overwrite:
        old = publish.existing_committed(session, req.tinker_path)
        if old is not None and old.tenant_id == principal.tenant_id and checkpoints.is_visible(old, now):
            replaced = old.size_bytes
    requested = max(0, sum(f.size_bytes for f in req.files) - credit)
    tenants.check_quota(session, principal.tenant_id, requested, now=now, replaced=replaced, lock=lock)


def _answer_files(
    ctx: Context, upload_id: str, req: UploadRequest, owned: set[str], *, added: bool = False
) -> tuple[list[FileAnswer], list[UploadFile]]:
    """One row per declared file and its answer. Part URLs are signed for at most
    ``presign_parts_batch`` parts in all (first files first); ``transfer`` pages out the rest.
    ``added``: files added to an open upload (``add_files``) get staging keys named after their path,
    so that several ranks adding files at once never share one."""
    s = ctx.settings
    rows: list[UploadFile] = []
    for i, f in enumerate(req.files):
        transfer = "present" if f.sha256 in owned else req.transfer
        row = UploadFile(
            upload_id=upload_id,
            path=f.path,
            size_bytes=f.size_bytes,
            sha256=f.sha256,
            transfer=transfer,
            received=transfer == "present",
        )
        if transfer == "presigned" and not direct_put(s, f.size_bytes):
            row.staging_key = (
                staging_key(upload_id, "a-" + hashlib.sha256(f.path.encode()).hexdigest()[:32])
                if added
                else staging_key(upload_id, i)
            )
        rows.append(row)
    parts = sum(multipart_plan(r.size_bytes, s.part_size_bytes)[1] for r in rows if _is_multipart(s, r))
    if parts > s.max_upload_parts:
        raise InvalidRequest(
            f"this upload would need {parts} presigned parts; at most {s.max_upload_parts} per upload "
            "(WEIGHTSTORE_MAX_UPLOAD_PARTS): split it or send it with transfer=stream"
        )
    budget = s.presign_parts_batch
    answers: list[FileAnswer] = []
    for row in rows:
        if _is_multipart(s, row):  # started on the store now; its parts are signed page by page
            row.multipart_upload_id = ctx.store.create_multipart(row.staging_key or "")
        ans = _transfer_answer(ctx, row, first_part=1, max_urls=budget)
        budget -= len(ans.part_urls)
        answers.append(ans)
    return answers, rows


def _record_upload(
    session: Session,
    principal: Principal,
    req: UploadRequest,
    upload_id: str,
    ttl: int | None,
    rows: list[UploadFile],
    *,
    now: datetime,
    expires_at: datetime,
) -> Upload:
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
        expires_at=expires_at,
    )
    session.add(upload)
    session.flush()
    for row in rows:
        session.add(row)
    # The upload holds its blobs against the collector from now on (mark reads open uploads
    # first); touching them restarts their grace period.
    blobs.touch(session, [f.sha256 for f in req.files], now)
    audit.record(
        session,
        at=now,
        action="upload.declare",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=str(req.tinker_path),
        upload_id=upload_id,
        files=len(req.files),
        bytes_to_send=sum(r.size_bytes for r in rows if r.transfer != "present"),
    )
    return upload


# --- add files (DCP ranks) -----------------------------------------------------------------------


def add_files(
    ctx: Context, principal: Principal, upload_id: str, files: list[DeclaredFile], *, transfer: str = "stream"
) -> list[FileAnswer]:
    """Declare more files of an open upload and answer how to send each, like ``declare`` does
    (dedup against the tenant's blobs, quota, presigned URLs). This is how the ranks of a PyTorch
    Distributed Checkpoint put their own files into the one upload their coordinator declared; only
    the coordinator's commit makes any of them visible. The upload's file set so far, plus these,
    must still be able to become a valid checkpoint (``formats.check_file_set``, incomplete allowed
    for a DCP layout). Renews the lease. Workflow, as ``declare``."""
    principal.require_write()
    if transfer not in {"stream", "presigned"}:
        raise InvalidRequest("transfer must be 'stream' or 'presigned'")
    if not files:
        raise InvalidRequest("add at least one file")
    s = ctx.settings
    for _ in range(DECLARE_ATTEMPTS):
        now = ctx.clock.now()
        with session_scope(ctx.engine) as session:
            upload = _load_open_upload(session, principal, upload_id, now)
            have = list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())
            req = _added_request(s, upload, have, files, transfer)
            _, owned = _check_declare(session, principal, req)
            _check_quota(session, principal, req, now=now, lock=False)
        answers, rows = _answer_files(ctx, upload_id, req, owned, added=True)
        now = ctx.clock.now()
        try:
            with session_scope(ctx.engine) as session:
                upload = _load_open_upload(session, principal, upload_id, now, lock=True)  # serialises the ranks
                taken = [r.path for r in rows if session.get(UploadFile, (upload_id, r.path)) is not None]
                if taken:
                    raise InvalidRequest(f"already part of upload {upload_id}: {', '.join(taken)}", files=taken)
                _, not_live = blobs.lock_live(session, [r.sha256 for r in rows])
                if {r.sha256 for r in rows if r.transfer == "present"} & set(not_live):
                    continue  # a reused blob is being collected: answer again (S2/S7, as declare)
                _check_quota(session, principal, req, now=now, lock=True)
                _extend(s, upload, now)
                session.add(upload)
                for row in rows:
                    session.add(row)
                blobs.touch(session, [r.sha256 for r in rows], now)
        except BaseException:
            for r in rows:
                if r.multipart_upload_id and r.staging_key:
                    ctx.store.abort_multipart(r.staging_key, r.multipart_upload_id)
            raise
        return answers
    raise CatalogBusy("the blobs these files would reuse are being collected right now; retry shortly")


def _added_request(
    s: Settings, upload: Upload, have: list[UploadFile], files: list[DeclaredFile], transfer: str
) -> UploadRequest:
    """The files being added, as a request that ``_check_declare``/``_check_quota``/``_answer_files``
    understand; checks the file set the upload would then hold."""
    everything = [(r.path, r.size_bytes, r.sha256) for r in have] + [(f.path, f.size_bytes, f.sha256) for f in files]
    paths = [p for p, _, _ in everything]
    publish.check_files(s, upload.kind, everything, complete=formats.layout_of(paths) != "dcp")
    total = sum(size for _, size, _ in everything)
    if total > s.max_upload_bytes:
        raise InvalidRequest(f"an upload may declare at most {s.max_upload_bytes} bytes in total ({total} with these files)")
    return UploadRequest(
        run_id=upload.run_id,
        kind=upload.kind,
        name=upload.name,
        files=files,
        overwrite=upload.overwrite,
        transfer=transfer,
        ttl_seconds=upload.ttl_seconds,
    )


def direct_put(s: Settings, size: int) -> bool:
    """A presigned file goes as one checksummed PUT to its blob key (else: staging, see module doc)."""
    return size <= single_put_limit(s)


def _is_multipart(s: Settings, row: UploadFile) -> bool:
    """A presigned file sent in parts (to its staging key): too large for one checksummed PUT."""
    return (
        row.transfer == "presigned"
        and row.staging_key is not None
        and not direct_put(s, row.size_bytes)
        and row.size_bytes >= s.multipart_threshold_bytes
    )


def _transfer_answer(ctx: Context, row: UploadFile, *, first_part: int, max_urls: int) -> FileAnswer:
    """How to send ``row``'s bytes now: nothing (held or already received), the stream URL, one
    presigned PUT (to the blob key with writer metadata, or to this upload's staging key), or a
    page of at most ``max_urls`` part URLs starting at ``first_part``. Signs nothing else."""
    s, ttl = ctx.settings, ctx.settings.presign_ttl_seconds
    ans = FileAnswer(row.path, row.size_bytes, row.sha256, "present" if row.received else row.transfer)
    if ans.transfer == "stream":
        ans.url = f"/v1/uploads/{row.upload_id}/files/{row.path}"
    elif ans.transfer != "presigned":
        pass
    elif row.staging_key is None:
        ans.url, ans.headers = ctx.store.presign_put(
            blob_key(row.sha256), ttl, sha256=row.sha256, metadata={WRITER_META: row.upload_id}
        )
    elif row.multipart_upload_id is None:
        ans.url, ans.headers = ctx.store.presign_put(row.staging_key, ttl, sha256=row.sha256)
    else:
        ans.part_size, ans.part_count = multipart_plan(row.size_bytes, s.part_size_bytes)
        if not 1 <= first_part <= ans.part_count:
            raise InvalidRequest(f"{row.path} has parts 1..{ans.part_count}; first_part={first_part} is out of range")
        ans.first_part = first_part
        last = min(ans.part_count, first_part + max(0, min(max_urls, s.presign_parts_batch)) - 1)
        ans.part_urls = [
            ctx.store.presign_part(row.staging_key, row.multipart_upload_id, n, ttl) for n in range(first_part, last + 1)
        ]
    return ans


def transfer(
    ctx: Context, principal: Principal, upload_id: str, path: str, *, first_part: int = 1, count: int | None = None
) -> FileAnswer:
    """How to send one file of an open upload now: a page of part URLs of a multipart file (at most
    ``presign_parts_batch``), or, after a commit answered ``upload_incomplete`` for it, where to
    send it again (its own staging key, or the stream URL). Workflow: one read, then signing."""
    principal.require_write()
    check_file_path(path)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        upload = _load_open_upload(session, principal, upload_id, now, lock=True)
        _extend(ctx.settings, upload, now)  # a client asking for part URLs is alive: renew its lease
        session.add(upload)
        row = _declared_file(session, upload_id, path)
    wanted = ctx.settings.presign_parts_batch if count is None else count
    if wanted < 1:
        raise InvalidRequest("count must be at least 1")
    return _transfer_answer(ctx, row, first_part=first_part, max_urls=wanted)


def lease_end(s: Settings, *, created_at: datetime, now: datetime) -> datetime:
    """Where a lease taken or renewed at ``now`` ends: one lease on, never past the upload's life."""
    return min(now + timedelta(seconds=s.upload_lease_seconds), created_at + timedelta(seconds=s.upload_expiry_seconds))


def _extend(s: Settings, upload: Upload, now: datetime) -> None:
    upload.expires_at = max(upload.expires_at, lease_end(s, created_at=upload.created_at, now=now))


def renew(ctx: Context, principal: Principal, upload_id: str) -> datetime:
    """Extend an open upload's lease by ``upload_lease_seconds`` (module doc) and return its new end.
    ``UploadExpired`` once the lease lapsed (even before the collector closed it) or the upload is
    closed: the client must declare again. One transaction that locks the upload row, so a renewal
    and the collector closing the upload never both succeed. Workflow (it commits)."""
    principal.require_write()
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        upload = _load_open_upload(session, principal, upload_id, now, lock=True)
        _extend(ctx.settings, upload, now)
        session.add(upload)
        return upload.expires_at


def _load_open_upload(session: Session, principal: Principal, upload_id: str, now: datetime, *, lock: bool = False) -> Upload:
    upload = session.get(Upload, upload_id, with_for_update=WRITE_LOCK if lock else None)
    if upload is None or upload.tenant_id != principal.tenant_id:
        raise NotFound(f"upload {upload_id} not found")
    if upload.state != UploadState.open:
        if upload.state == UploadState.aborted:  # by `runs rm`? then say so (issue 12, part 5)
            runs.refuse_deleted(session.get(TrainingRun, upload.run_id))
        raise UploadExpired(f"upload {upload_id} is {upload.state}")
    if upload.expires_at <= now:
        raise UploadExpired(f"upload {upload_id} expired at {upload.expires_at.isoformat()}")
    return upload


def _declared_file(session: Session, upload_id: str, path: str) -> UploadFile:
    row = session.get(UploadFile, (upload_id, path))
    if row is None:
        raise NotFound(f"file {path} is not part of upload {upload_id}")
    return row


# --- stream -------------------------------------------------------------------------------------


def open_stream(ctx: Context, principal: Principal, upload_id: str, path: str) -> BlobWriter:
    """Start receiving ``path`` of an open upload through the service. Workflow."""
    principal.require_write()
    check_file_path(path)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        _load_open_upload(session, principal, upload_id, now)
        row = _declared_file(session, upload_id, path)
        exists = blobs.reusable(session, row.sha256) is not None
    return blobs.open_writer(ctx, row.sha256, row.size_bytes, exists=exists)


def finish_stream(ctx: Context, principal: Principal, upload_id: str, path: str, writer: BlobWriter) -> None:
    """Verify the bytes ``writer`` received, then mark the blob live and the file received. Workflow."""
    writer.finish()
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        row = _declared_file(session, upload_id, path)
        if writer.exists and session.get(Blob, row.sha256) is None and ctx.store.head(writer.key) is None:
            # The bytes were only hashed (the blob existed) and the collector reclaimed it meanwhile:
            # nothing durable holds them, so the client must send them again.
            raise CatalogBusy("these bytes were garbage-collected while being received; send them again")
        blobs.mark_live(session, row.sha256, row.size_bytes, now, chunk_digests=writer.chunk_digests)
        row.received = True
        session.add(row)


def receive_bytes(ctx: Context, principal: Principal, upload_id: str, path: str, data: bytes) -> None:
    """Convenience for small files and tests: the whole body at once. Workflow."""
    writer = open_stream(ctx, principal, upload_id, path)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    finish_stream(ctx, principal, upload_id, path, writer)


# --- commit -------------------------------------------------------------------------------------


class _NotProven(Exception):
    """A presigned file this commit cannot prove the tenant sent (collected into one ``UploadIncomplete``)."""


def resend_key(upload_id: str, path: str) -> str:
    """This upload's own staging key for ``path`` sent again (never a declare-time ``staging/<upload>/<n>``)."""
    return staging_key(upload_id, "p-" + hashlib.sha256(path.encode()).hexdigest()[:32])


def _finalize_direct(ctx: Context, row: UploadFile, tenant_id: str) -> ChunkDigests | None:
    """Check a presigned single PUT at its blob key: one HEAD, no read-back (module doc). Returns
    the chunk digests when the bytes had to be read back after all (they are hashed in that read).
    ``_NotProven`` when the object is absent or another tenant's upload wrote it last: the two
    cases are answered identically (S3, S4: the answer never says whether anyone else holds them)."""
    store = ctx.store
    final = blob_key(row.sha256)
    info = store.head(final, checksum=True)
    writer = info.metadata.get(WRITER_META) if info is not None else None
    if info is None or writer is None:
        raise _NotProven(row.path)
    if writer != row.upload_id:
        # Another upload PUT the same bytes after ours. Fine if it was this tenant's (e.g. a state
        # and a sampler save of one step in parallel); otherwise nothing proves we sent them.
        with session_scope(ctx.engine) as session:
            other = session.get(Upload, writer)
            if other is None or other.tenant_id != tenant_id:
                raise _NotProven(row.path)
    if info.size == row.size_bytes and info.stored_sha256_is(row.sha256):
        return None
    # The store kept no checksum (or a different one): it did not enforce the signed one, so check
    # the bytes. A mismatch means s3_verifies_checksums is wrong for this store.
    hashed = _hash_back(ctx, final, row) if info.size == row.size_bytes else None
    if hashed is None:
        log.error(
            "object store accepted a presigned PUT whose bytes differ from the signed checksum: %s "
            "(set WEIGHTSTORE_S3_VERIFIES_CHECKSUMS=false for this store)",
            final,
        )
        raise IntegrityError(f"{row.path}: stored bytes do not match sha256 {row.sha256}", file=row.path)
    return hashed


def _hash_back(ctx: Context, key: str, row: UploadFile) -> ChunkDigests | None:
    """Read ``key`` back once: its chunk digests when the bytes hash to ``row.sha256``, else None
    (rule C1: the chunks are only vouched for after the whole file checked out, in the same read)."""
    digest, chunk_digests = blob_chunks.hash_key(ctx.store, key, row.size_bytes, ctx.settings.chunk_size_bytes)
    return chunk_digests if digest == row.sha256 else None


def _finalize_presigned(ctx: Context, row: UploadFile, tenant_id: str) -> ChunkDigests | None:
    """Verify a presigned transfer (at its blob key, or at its staging key, then moved into place).
    Returns the blob's chunk digests when its bytes were read back here (hashed in the same read),
    None when nothing was read (the store checked the signed sha256: ``chunks.backfill`` later)."""
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
        if not row.multipart_upload_id and direct_put(ctx.settings, row.size_bytes):
            # Re-offered at its staging key but sent to the blob key URL of the first answer: that
            # is proof too, on the blob key's own terms.
            return _finalize_direct(ctx, row, tenant_id)
        raise _NotProven(row.path)
    if info.size != row.size_bytes:
        store.delete(key)
        raise IntegrityError(f"{row.path}: {info.size} bytes stored, {row.size_bytes} declared", file=row.path)
    hashed: ChunkDigests | None = None
    if not (info.stored_sha256_is(row.sha256) and not row.multipart_upload_id and ctx.settings.s3_verifies_checksums):
        # Multipart objects carry a composite checksum, not the whole-file sha256: read it back,
        # hashing the chunks in the same read (issue 14: no second read by the backfill).
        hashed = _hash_back(ctx, key, row)
        if hashed is None:
            store.delete(key)
            raise IntegrityError(f"{row.path}: sha256 mismatch: stored bytes are not declared {row.sha256}", file=row.path)
    final = blob_key(row.sha256)
    held = store.head(final, checksum=True)
    # Content-addressed: an object at the blob key was verified when written (S1). Keep it when it
    # is these bytes (size, and the checksum where the store kept one): no copy.
    if held is None or held.size != row.size_bytes or (held.checksum_sha256 and not held.stored_sha256_is(row.sha256)):
        store.copy(key, final, row.size_bytes)
    store.delete(key)
    return hashed


@dataclass(frozen=True)
class CommitResult:
    checkpoint: Checkpoint
    tinker_path: str
    bytes_received: int
    replayed: bool = False
    """The upload was already committed: this answers a repeated commit and committed nothing new."""


def commit(
    ctx: Context,
    principal: Principal,
    upload_id: str,
    *,
    request_id: str | None = None,
    expect_files: Sequence[str] | None = None,
) -> CommitResult:
    """Step 3: verify every file, validate formats, then commit the checkpoint atomically. Workflow:
    object-store checks run outside any transaction (they can take minutes).

    ``expect_files``: the exact file set the committer knows the checkpoint has (a DCP coordinator:
    every rank's data files named in its metadata, and the metadata). Any difference, e.g. a rank
    that never added its file, refuses the commit with ``upload_incomplete`` naming the missing files."""
    principal.require_write()
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        replay = _committed_answer(session, principal, upload_id)
        if replay is not None:
            return replay
        upload = _load_open_upload(session, principal, upload_id, now, lock=True)
        _extend(ctx.settings, upload, now)  # finalising can take minutes: start them on a fresh lease
        session.add(upload)
        kind = upload.kind
        rows = list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())
    if expect_files is not None:
        declared = {r.path for r in rows}
        absent, extra = sorted(set(expect_files) - declared), sorted(declared - set(expect_files))
        if absent:
            raise UploadIncomplete(f"files not added yet: {', '.join(absent[:10])}", files=absent)
        if extra:
            raise InvalidRequest(f"upload {upload_id} holds files the committer does not expect: {', '.join(extra[:10])}")
    formats.check_file_set(kind, [r.path for r in rows])  # complete now: a DCP layout's metadata is in
    missing = [r.path for r in rows if r.transfer == "stream" and not r.received]
    if missing:
        raise UploadIncomplete(f"files not received yet: {', '.join(missing)}", files=missing)
    received = _finalize_transfers(ctx, principal, rows)
    _validate_formats(ctx, rows)
    now = ctx.clock.now()
    entries = [(r.path, r.size_bytes, r.sha256) for r in rows]
    resend: list[str] = []
    try:
        with session_scope(ctx.engine) as session:
            upload = _load_open_upload(session, principal, upload_id, now)
            new = publish.NewCheckpoint(
                run_id=upload.run_id,
                kind=upload.kind,
                name=upload.name,
                ttl_seconds=upload.ttl_seconds,
                user_metadata=upload.user_metadata,
                overwrite=upload.overwrite,
            )
            runs.lock_for_write(session, principal.tenant_id, upload.run_id)  # lock order: run, blobs, tenant
            live, not_live = blobs.lock_live(session, [sha for _, _, sha in entries])
            if not_live:
                # A dedup hit that the collector reclaimed meanwhile: the client must send the bytes.
                resend = _mark_for_resend(session, rows, set(not_live))
            else:
                # reserved: the declare counted these bytes against the quota (they stay counted while open)
                ckpt = publish.add_checkpoint(session, principal.tenant_id, new, entries, live, now=now, reserved=True)
                upload.state, upload.checkpoint_id = UploadState.committed, ckpt.id
                session.add(upload)
                audit.record(
                    session,
                    at=now,
                    action="checkpoint.commit",
                    tenant_id=principal.tenant_id,
                    key_id=principal.key_id,
                    target=str(new.tinker_path),
                    request_id=request_id,
                    upload_id=upload_id,
                    size_bytes=ckpt.size_bytes,
                )
                session.flush()
    except DBIntegrityError as exc:
        # Two committers raced for the same name: the partial unique index picked the winner.
        raise AlreadyExists(f"{new.tinker_path} already exists") from exc
    if resend:
        raise UploadIncomplete(f"files must be sent again: {', '.join(resend)}", files=resend)
    return CommitResult(ckpt, str(new.tinker_path), received)


def _committed_answer(session: Session, principal: Principal, upload_id: str) -> CommitResult | None:
    """The answer of an upload's commit when it is already committed (commit is idempotent: a client
    whose replica died before answering sends it again, to any replica), else None."""
    upload = session.get(Upload, upload_id)
    if upload is None or upload.tenant_id != principal.tenant_id or upload.state != UploadState.committed:
        return None
    ckpt = session.get(Checkpoint, upload.checkpoint_id) if upload.checkpoint_id else None
    if ckpt is None:
        return None
    rows = session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all()
    sent = sum(r.size_bytes for r in rows if r.transfer != "present")
    path = str(TinkerPath(upload.run_id, upload.kind, upload.name))
    return CommitResult(ckpt, path, sent, replayed=True)


def _finalize_transfers(ctx: Context, principal: Principal, rows: list[UploadFile]) -> int:
    """Check every presigned file in the store and mark its blob live; returns the bytes received.
    Files it cannot prove were sent by this tenant are re-offered at this upload's own staging key
    and reported together in one ``UploadIncomplete`` (module doc)."""
    received = 0
    unproven: list[UploadFile] = []
    for row in rows:
        if row.transfer == "presigned" and not row.received:
            try:
                hashed = _finalize_presigned(ctx, row, principal.tenant_id)
            except _NotProven:
                unproven.append(row)
                continue
            received += row.size_bytes
            with session_scope(ctx.engine) as session:
                blobs.mark_live(session, row.sha256, row.size_bytes, ctx.clock.now(), chunk_digests=hashed)
                db_row = _declared_file(session, row.upload_id, row.path)
                db_row.received = True
                session.add(db_row)
        elif row.transfer == "stream":
            received += row.size_bytes
    if unproven:
        _restage(ctx, unproven)
        paths = [r.path for r in unproven]
        raise UploadIncomplete(
            f"files not uploaded yet: {', '.join(paths)}; GET /v1/uploads/{{upload_id}}/files/{{path}}/transfer "
            "says where to send each, then commit again",
            files=paths,
        )
    return received


def _restage(ctx: Context, rows: list[UploadFile]) -> None:
    """Point unproven single-PUT files at this upload's own staging key (a multipart file already
    has one). One short transaction."""
    with session_scope(ctx.engine) as session:
        for r in rows:
            db_row = _declared_file(session, r.upload_id, r.path)
            if db_row.staging_key is None and not db_row.received:
                db_row.staging_key = resend_key(r.upload_id, r.path)
                session.add(db_row)


def _validate_formats(ctx: Context, rows: list[UploadFile]) -> None:
    """Structural checks from headers only (range reads of the stored objects)."""
    s = ctx.settings
    for row in rows:
        key = blob_key(row.sha256)

        def read_range(start: int, n: int, key: str = key) -> bytes:
            return ctx.store.read_range(key, start, n)

        formats.validate_file(
            row.path, row.size_bytes, read_range, max_header=s.max_safetensors_header_bytes, max_json=s.max_json_file_bytes
        )


def _mark_for_resend(session: Session, rows: list[UploadFile], not_live: set[str]) -> list[str]:
    """Turn the files whose blob is gone back into not-yet-received stream files."""
    paths = []
    for r in rows:
        if r.sha256 in not_live:
            db_row = session.get(UploadFile, (r.upload_id, r.path))
            if db_row is not None:
                db_row.transfer, db_row.received = "stream", False
                session.add(db_row)
            paths.append(r.path)
    return paths


def abort(ctx: Context, principal: Principal, upload_id: str) -> None:
    """Close an open upload and abort its multipart uploads; through any replica (the state is in
    the catalog), and also once its lease lapsed but before the collector closed it. Workflow."""
    principal.require_write()
    with session_scope(ctx.engine) as session:
        upload = session.get(Upload, upload_id, with_for_update=WRITE_LOCK)
        if upload is None or upload.tenant_id != principal.tenant_id:
            raise NotFound(f"upload {upload_id} not found")
        if upload.state != UploadState.open:
            raise UploadExpired(f"upload {upload_id} is {upload.state}")
        upload.state = UploadState.aborted
        session.add(upload)
        rows = list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())
    for r in rows:
        if r.multipart_upload_id and r.staging_key:
            ctx.store.abort_multipart(r.staging_key, r.multipart_upload_id)


def get_upload(session: Session, principal: Principal, upload_id: str) -> tuple[Upload, list[UploadFile]]:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.tenant_id != principal.tenant_id:
        raise NotFound(f"upload {upload_id} not found")
    return upload, list(session.exec(select(UploadFile).where(UploadFile.upload_id == upload_id)).all())


__all__ = [
    "USER_KINDS",
    "WRITER_META",
    "CommitResult",
    "DeclaredFile",
    "FileAnswer",
    "UploadAnswer",
    "UploadRequest",
    "abort",
    "add_files",
    "commit",
    "declare",
    "direct_put",
    "finish_stream",
    "get_upload",
    "held_blobs",
    "lease_end",
    "open_stream",
    "receive_bytes",
    "renew",
    "resend_key",
    "transfer",
    "validate_request",
]
