"""The Hugging Face Hub *write* side: ``create_repo``, preupload, the LFS batch and the NDJSON commit
(issue 15, part 2), all on top of the native upload protocol (``weightstore.uploads``).

Mapping (the README's "push" table):

| pushed to ``main``             | becomes (``tinker://tenant:x/...``)       | served back as (revision, or in ``main``) |
|--------------------------------|-------------------------------------------|-------------------------------------------|
| ``create_repo("tenant/x")``    | run ``tenant:x`` (base model: see below)  | repo ``tenant/x``                         |
| ``sampler_weights/NAME/...``   | sampler checkpoint                        | ``sampler_weights/NAME``                  |
| ``weights/NAME/...``           | full-state checkpoint                     | ``weights/NAME``                          |
| ``FOLDER/...``                 | ``files`` checkpoint ``files/FOLDER``     | ``files/FOLDER``; ``main``'s ``FOLDER/``  |
| a root file (``config.json``)  | ``files`` checkpoint ``files/root``       | ``files/root``; ``main``'s root           |
| an export's segment, ``root/``, ``files/``, another revision | refused (400) | nothing stored                |

A run made by ``create_repo`` has base model "unknown" (the Hub's call names none) until a push
carries an ``adapter_config.json`` (at a folder's root) whose ``base_model_name_or_path`` is a Hub
model id (``org/name`` or ``name``): the run then adopts it, and its ``r`` as the run's LoRA rank if
the run has none, once (a later push naming another base changes nothing; a local path such as
``/tmp/tiny``, what ``save_pretrained`` writes for a model loaded from disk, is not adopted). Exports
and the Tinker API then see the base like that of any native run.

``files`` is the kind of what a Hub client pushes that is no Tinker checkpoint (a ``Trainer``'s model
and its ``last-checkpoint/`` with ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``): no required
files, every file validated by its extension as in any checkpoint (``*.safetensors`` structurally,
``*.json`` parsed; pickles such as ``optimizer.pt`` are opaque bytes: weightstore never unpickles
them), listed and managed by the native API (``/v1/checkpoints/RUN/files/NAME``), invisible to the
Tinker API (``TINKER_KINDS``). It is honestly *not* a full-state checkpoint: Tinker's full state needs
``optimizer.safetensors``. A push *adds* to such a folder, as on the Hub: the files it does not
name stay (held by the tenant, so they move no byte) and the folder is replaced by a new version
(``overwrite``; the old version's storage ends, billed until then). Its TTL is the tenant's default
for full state. So ``main`` looks exactly like what a Trainer pushed, ``from_pretrained("tenant/x")``
loads its model, and ``snapshot_download(..., allow_patterns="last-checkpoint/*")`` gives the
folder for ``resume_from_checkpoint``.

One commit may carry several folders: every folder is validated first (names, paths, required
files: the native declare's rules), then each becomes one checkpoint through declare → verified
transfer → commit, each atomic; a later folder failing at run time leaves the earlier ones committed
(the error names the failure). A Tinker-kind checkpoint never changes: pushing different bytes to an
existing ``SEG/NAME`` is ``already_exists``; pushing the same bytes again is a no-op because
preupload answers each existing file's sha256 as its ``oid`` and the client then skips it (0 bytes,
no commit). A ``deletedFolder`` of ``SEG/NAME`` (or of a ``files`` folder) deletes that checkpoint (the
native delete). ``deletedFile``/``deletedFolder`` *inside* a ``files`` checkpoint make a new version
without those files (the folder goes with its last file; a path matching nothing is
``EntryNotFound``); inside a Tinker-kind checkpoint they are refused (400, before anything is stored):
those never change. TTL is the tenant's default for the kind, billing the native one (the ledger's
``commit`` event), quota the same check as a declare.

Bytes never pass through the API: preupload answers ``lfs`` for every non-empty file, so the
client PUTs it straight to the store; only empty files (the client's own rule) and copies come
inline in the NDJSON, and those (at most ``INLINE_MAX_BYTES`` in all) are stored as blobs by the
service itself, through the same verified path.

How the LFS batch fits the upload protocol. The batch names only sha256s and sizes (no paths, so no
checkpoint yet), and the Hub's client PUTs with *no* headers, so it cannot send the checksum and
writer metadata a native presigned PUT is signed with. So:
- objects the tenant already holds (``uploads.held_blobs``, the native dedup rule) are answered as
  present, with no actions; every other object, whether or not another tenant stores it, gets a
  presigned PUT (no cross-tenant side channel, S4);
- those PUTs go to staging keys of a *carrier* upload (``Upload`` of kind ``hub``): one per batch,
  open for ``upload_expiry_seconds`` (the Hub's client cannot renew a lease), reserving its bytes
  against the quota, its staging objects reclaimed by the collector like any closed upload's;
- the commit declares each checkpoint natively (``uploads.declare`` with transfer ``stream``, so
  nothing is presigned or started on the store) and points each file the declare wants sent at the
  carrier's staging object (or, for an inline file,
  at this upload's own staging key, written by the service). ``uploads.commit`` then verifies it
  like any staged file (size, then sha256 re-read unless the store kept the checksum), copies it
  to its blob key and commits. Only the pushing tenant's own carriers are searched, so a commit can
  never borrow another tenant's bytes.
- quota: the carrier reserves the bytes from the batch on; the declare *takes that reservation
  over* (``uploads.Handover``: in the transaction that records the upload, under the tenant lock, it
  credits those bytes and deletes the carrier rows), so the same bytes never count twice and a push
  that fits is never refused. The emptied carrier stays open until the commit ends (the collector
  keeps an open upload's staging objects), then is closed.
- a push whose commit never came (the client died or its connection broke after the PUTs) leaves its
  carrier open, reserving those bytes until it expires. Pushed again, its objects are answered from
  that reservation, not a second one (``_reusable``): an object staged with its size gets no actions
  (the commit verifies it as usual; 0 bytes move again), an unstaged one within one PUT a fresh PUT
  to the same staging key, a multipart upload still in flight (same run) fresh part URLs of the same
  S3 upload and a completion URL with a new token (a carrier keeps up to ``MAX_COMPLETION_TOKENS``,
  so the broken push's own URL stays valid too); the carrier's expiry is extended. So a retry that
  fits the quota is never refused because of the attempt that failed.
- objects above one PUT (``lfs_put_limit``: ``single_put_max_bytes``, 5 GiB) get the Hub's
  ``multipart`` answer: ``header`` = ``chunk_size`` plus part URLs ``"1".."N"`` (presigned S3
  ``upload_part`` URLs of a multipart upload started at the carrier's staging key; sizes from
  ``objectstore.multipart_plan``), ``href`` = the completion route
  ``/{repo}.git/info/lfs/complete/{carrier}/{oid}?token=...``. The client PUTs the parts, then POSTs
  ``{oid, parts: [{partNumber, etag}]}`` to ``href`` *without its token*, so the URL carries a
  per-carrier random token (stored hashed in the carrier's ``user_metadata``) and that token is the
  capability; a key sent anyway must be the carrier's tenant's. ``complete_multipart`` checks every
  part against the store's own listing (number, etag, size), completes the upload and marks the row
  received; the commit then treats it like any staged object (size, sha256 re-read, copy).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from weightstore import checkpoints, formats, hub, publish, retention, runs, tenants, uploads
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import for_write, session_scope
from weightstore.errors import InvalidRequest, UploadIncomplete, WeightstoreError
from weightstore.models import TrainingRun, Upload, UploadFile, UploadState
from weightstore.names import KIND_BY_SEGMENT, TinkerPath, check_file_path, check_name, check_run_id, new_id
from weightstore.objectstore import blob_key, multipart_plan, staging_key
from weightstore.settings import Settings

CARRIER_KIND = "hub"
"""``Upload.kind`` of an LFS batch's carrier upload (never committed itself)."""
CARRIER_NAME = "lfs-batch"
UNKNOWN_BASE = "unknown"
"""Base model of a run made by ``create_repo``: the Hub's call names none (``adapter_config.json``'s
``base_model_name_or_path`` does)."""
INLINE_MAX_BYTES = 16 * 1024 * 1024
"""Largest NDJSON commit body: inline files are only the client's empty files and copies."""
MAX_COMMIT_LINES = 10_000
PUSHABLE_KINDS = ("sampler", "training", "files")
TOKEN_META = "complete_token_sha256"
MAX_COMPLETION_TOKENS = 16
"""Completion tokens a carrier keeps (space-separated digests under ``TOKEN_META``): one per batch
that answered from its multipart uploads, the newest kept."""
"""Carrier ``user_metadata`` key: sha256 of the token in its multipart completion URLs."""


# --- repos -----------------------------------------------------------------------------------------


def own_run(session: Session, principal: Principal, repo_id: str) -> TrainingRun:
    """The caller's own live run behind ``repo_id``; anything else (another tenant's repo, published
    or not, a base model, nothing) is ``RepoNotFound``: foreign = missing, on writes too."""
    namespace, name = hub.split_repo_id(repo_id)
    run = hub.find_run(session, namespace, name) if namespace == principal.tenant_id else None
    if run is None or run.tenant_id != principal.tenant_id:
        raise hub.RepoNotFound(f"repository {repo_id!r} not found")
    return run


def create_repo(session: Session, principal: Principal, *, namespace: str | None, name: str, now: datetime) -> str:
    """``create_repo``: the run ``{tenant}:{name}``; answers the repo id. Idempotent (an existing repo
    of the caller's is answered as created: the Hub's 409 is a permanent error, never sent here)."""
    principal.require_write()
    namespace = namespace or principal.tenant_id
    repo_id = f"{namespace}/{name}"
    if not hub.is_repo_part(name) or namespace != principal.tenant_id:
        raise hub.RepoNotFound(f"cannot create {repo_id[:200]!r}: the namespace is your tenant, {principal.tenant_id!r}")
    if hub.find_run(session, namespace, name) is not None:
        return repo_id
    runs.create_run(session, principal, base_model=UNKNOWN_BASE, now=now, run_id=check_run_id(f"{namespace}:{name}"))
    return repo_id


def _require_main(revision: str) -> None:
    if revision != hub.MAIN:
        raise InvalidRequest(f"pushes go to revision 'main' (got {revision[:120]!r}): a checkpoint revision never changes")


# --- preupload ---------------------------------------------------------------------------------------


def preupload(
    session: Session, principal: Principal, repo_id: str, revision: str, files: list[dict[str, Any]], *, now: datetime
) -> list[dict[str, object]]:
    """Upload mode per file: ``lfs`` (straight to the store) for every non-empty file; the sha256 of a
    file ``main`` already holds at that path as ``oid``, so the client skips unchanged files."""
    own_run(session, principal, repo_id)
    _require_main(revision)
    held = {f.path: f.sha256 for f in hub.snapshot(session, principal, repo_id, hub.MAIN, now=now).files}
    out: list[dict[str, object]] = []
    for f in files:
        path, size = f.get("path"), f.get("size")
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest("preupload: every file needs a path and a non-negative size")
        out.append({"path": path, "uploadMode": "lfs" if size > 0 else "regular", "shouldIgnore": False, "oid": held.get(path)})
    return out


# --- LFS batch ---------------------------------------------------------------------------------------


def lfs_put_limit(s: Settings) -> int:
    """Largest object the LFS batch answers with one PUT (``basic``); larger ones get the Hub's
    ``multipart`` transfer. S3's one-PUT limit (``single_put_max_bytes``, 5 GiB): the carrier's PUTs
    carry no checksum (the Hub's client sends no headers) and the commit re-hashes every staged object,
    so whether the store verifies checksums (``single_put_limit``) does not matter here."""
    return s.single_put_max_bytes


def lfs_batch(
    ctx: Context, principal: Principal, repo_id: str, objects: list[dict[str, Any]], *, base_url: str
) -> list[dict[str, object]]:
    """The LFS batch answer (module doc): held objects with no actions; the others a headerless
    presigned PUT to a staging key of one carrier upload, or above ``lfs_put_limit`` the Hub's
    multipart answer: ``header`` = ``chunk_size`` and the presigned part URLs numbered from 1,
    ``href`` = the completion URL (``complete_multipart``). Workflow: the multipart uploads are started on
    the store between the checking and the recording transaction (aborted if recording fails)."""
    principal.require_write()
    wanted: dict[str, int] = {}
    for o in objects:
        oid, size = o.get("oid"), o.get("size")
        if not isinstance(oid, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest("lfs batch: every object needs an oid (sha256) and a size")
        wanted[_check_sha(oid)] = size
    s = ctx.settings
    limit = lfs_put_limit(s)
    with session_scope(ctx.engine) as session:
        run_id = own_run(session, principal, repo_id).id
        held = uploads.held_blobs(session, principal.tenant_id, list(wanted))
        pending = {sha: size for sha, size in wanted.items() if sha not in held}
        earlier = _staged_carrier_rows(session, principal.tenant_id, sorted(pending), ctx.clock.now())
    reuse = _reusable(ctx, earlier, pending, limit)
    big = {sha: size for sha, size in pending.items() if sha not in reuse and size > limit}
    resumed = _resume_multiparts(ctx, principal.tenant_id, run_id, big)
    send = {sha: size for sha, size in pending.items() if sha not in reuse and sha not in resumed}
    if send:
        with session_scope(ctx.engine) as session:
            tenants.check_quota(session, principal.tenant_id, sum(send.values()), now=ctx.clock.now(), lock=False)
    plans = {sha: multipart_plan(size, s.part_size_bytes) for sha, size in send.items() if size > limit}
    resumed_parts = sum(multipart_plan(r.size_bytes, s.part_size_bytes)[1] for r, _ in resumed.values())
    if sum(n for _, n in plans.values()) + resumed_parts > s.max_upload_parts:
        raise InvalidRequest(
            f"this push would need more than {s.max_upload_parts} presigned parts (WEIGHTSTORE_MAX_UPLOAD_PARTS)"
        )
    if reuse:
        with session_scope(ctx.engine) as session:
            _extend_carriers(ctx, session, {row.upload_id for row, _ in reuse.values()})
    answers = {sha: _reused_answer(ctx, sha, size, reuse[sha]) for sha, size in pending.items() if sha in reuse}
    answers.update(_resumed_answers(ctx, repo_id, base_url, resumed))
    if not send:
        return [answers.get(sha, {"oid": sha, "size": size}) for sha, size in wanted.items()]
    carrier_id, token = new_id("upl"), secrets.token_urlsafe(32)
    started = {sha: ctx.store.create_multipart(staging_key(carrier_id, sha)) for sha in plans}
    try:
        now = ctx.clock.now()
        with session_scope(ctx.engine) as session:
            own_run(session, principal, repo_id)
            tenants.check_quota(session, principal.tenant_id, sum(send.values()), now=now, lock=True)
            session.add(
                Upload(
                    id=carrier_id,
                    tenant_id=principal.tenant_id,
                    run_id=run_id,
                    kind=CARRIER_KIND,
                    name=CARRIER_NAME,
                    user_metadata={TOKEN_META: _token_digest(token)},
                    created_at=now,
                    expires_at=now + timedelta(seconds=s.upload_expiry_seconds),
                )
            )
            session.flush()
            for sha, size in send.items():
                session.add(
                    UploadFile(
                        upload_id=carrier_id,
                        path=_carrier_path(sha),
                        size_bytes=size,
                        sha256=sha,
                        transfer="presigned",
                        staging_key=staging_key(carrier_id, sha),
                        multipart_upload_id=started.get(sha),
                    )
                )
    except WeightstoreError:
        for sha, mpu in started.items():
            ctx.store.abort_multipart(staging_key(carrier_id, sha), mpu)
        raise
    out: list[dict[str, object]] = []
    for sha, size in wanted.items():
        entry: dict[str, object] = {"oid": sha, "size": size}
        key = staging_key(carrier_id, sha)
        if sha in answers:
            entry = answers[sha]
        elif sha in plans:
            href = _completion_url(base_url, repo_id, carrier_id, sha, token)
            entry["actions"] = _multipart_actions(ctx, key, started[sha], size, href)
        elif sha in send:
            entry["actions"] = _put_actions(ctx, key)
        out.append(entry)
    return out


def _reusable(
    ctx: Context, earlier: dict[str, UploadFile], pending: dict[str, int], limit: int
) -> dict[str, tuple[UploadFile, bool]]:
    """The objects an earlier batch of this tenant already reserves (a push whose commit never came:
    the client died, the connection broke): per sha256 the carrier row and whether its object is
    staged with the declared size. Answered again from that reservation, not a second one (module
    doc). A row of another size, or above one PUT and not staged, is not reused here."""
    out: dict[str, tuple[UploadFile, bool]] = {}
    for sha, row in earlier.items():
        if row.size_bytes != pending[sha] or not row.staging_key:
            continue
        info = ctx.store.head(row.staging_key)
        staged = info is not None and info.size == row.size_bytes
        if staged or row.size_bytes <= limit:
            out[sha] = (row, staged)
    return out


def _reused_answer(ctx: Context, sha: str, size: int, reused: tuple[UploadFile, bool]) -> dict[str, object]:
    """A staged object: no actions (the commit verifies it like any staged object, and a commit that
    fails releases the reservation, so a bad object is offered again next time); otherwise a fresh
    PUT to the same staging key (the same bytes, so a concurrent push's PUT there is harmless)."""
    row, staged = reused
    entry: dict[str, object] = {"oid": sha, "size": size}
    if not staged:
        entry["actions"] = _put_actions(ctx, row.staging_key or "")
    return entry


def _multipart_actions(ctx: Context, key: str, multipart_id: str, size: int, href: str) -> dict[str, object]:
    """The Hub's multipart ``actions``: ``chunk_size`` and presigned part URLs "1".."N" of the S3
    multipart upload ``multipart_id`` at ``key``, and the completion ``href``."""
    ttl = ctx.settings.presign_ttl_seconds
    part_size, count = multipart_plan(size, ctx.settings.part_size_bytes)
    header = {"chunk_size": str(part_size)}
    header.update({str(n): ctx.store.presign_part(key, multipart_id, n, ttl) for n in range(1, count + 1)})
    return {"upload": {"href": href, "header": header, "expires_in": ttl}}


def _completion_url(base_url: str, repo_id: str, carrier_id: str, sha256: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/{repo_id}.git/info/lfs/complete/{carrier_id}/{sha256}?token={token}"


def _resume_multiparts(ctx: Context, tenant_id: str, run_id: str, sizes: dict[str, int]) -> dict[str, tuple[UploadFile, str]]:
    """Per sha256 of ``sizes``, the tenant's own multipart upload still in flight for it, with the same
    size, in an open carrier of this repo's run (a push that broke before completing it), taken up by
    this batch: in one transaction, under each carrier's row lock and re-read there, a new completion
    token is added to the carrier's (the broken push's own stays valid) and its expiry extended.
    Answers (row, token); a carrier that closed or a multipart completed meanwhile is left out (its
    object is then reserved anew or answered as staged)."""
    if not sizes:
        return {}
    now = ctx.clock.now()
    out: dict[str, tuple[UploadFile, str]] = {}
    with session_scope(ctx.engine) as session:
        candidates = session.exec(
            select(UploadFile)
            .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
            .where(
                Upload.tenant_id == tenant_id,
                Upload.run_id == run_id,
                Upload.kind == CARRIER_KIND,
                col(UploadFile.sha256).in_(sorted(sizes)),
                col(UploadFile.multipart_upload_id).is_not(None),
            )
        ).all()
        for cid in sorted({r.upload_id for r in candidates}):
            carrier = session.exec(
                for_write(select(Upload).where(Upload.id == cid).execution_options(populate_existing=True))
            ).first()
            if carrier is None or carrier.state != UploadState.open or carrier.expires_at <= now:
                continue
            rows = session.exec(
                select(UploadFile)
                .where(UploadFile.upload_id == cid, col(UploadFile.sha256).in_(sorted(sizes)))
                .execution_options(populate_existing=True)
            ).all()
            mine = [r for r in rows if r.multipart_upload_id and r.size_bytes == sizes[r.sha256] and r.sha256 not in out]
            if not mine:
                continue
            token = secrets.token_urlsafe(32)
            meta = dict(carrier.user_metadata or {})
            digests = [*meta.get(TOKEN_META, "").split(), _token_digest(token)]
            meta[TOKEN_META] = " ".join(digests[-MAX_COMPLETION_TOKENS:])
            carrier.user_metadata = meta
            session.add(carrier)
            out.update({r.sha256: (r, token) for r in mine})
        _extend_carriers(ctx, session, {r.upload_id for r, _ in out.values()})
    return out


def _resumed_answers(
    ctx: Context, repo_id: str, base_url: str, resumed: dict[str, tuple[UploadFile, str]]
) -> dict[str, dict[str, object]]:
    """The Hub's multipart answer for the multipart uploads ``_resume_multiparts`` took up: fresh part
    URLs of the same S3 upload (re-sent parts replace the earlier ones: the same bytes) and the
    completion URL with the new token."""
    answers: dict[str, dict[str, object]] = {}
    for sha, (row, token) in resumed.items():
        href = _completion_url(base_url, repo_id, row.upload_id, sha, token)
        actions = _multipart_actions(ctx, row.staging_key or "", row.multipart_upload_id or "", row.size_bytes, href)
        answers[sha] = {"oid": sha, "size": row.size_bytes, "actions": actions}
    return answers


def _extend_carriers(ctx: Context, session: Session, carrier_ids: set[str]) -> None:
    """Carriers a batch answers from stay open for another ``upload_expiry_seconds``: the push that
    answers from them is just starting (an expiry already later is kept)."""
    until = ctx.clock.now() + timedelta(seconds=ctx.settings.upload_expiry_seconds)
    session.execute(
        sa.update(Upload)
        .where(
            col(Upload.id).in_(sorted(carrier_ids)),
            col(Upload.state) == UploadState.open,
            col(Upload.expires_at) < until,
        )
        .values(expires_at=until)
    )


def _put_actions(ctx: Context, key: str) -> dict[str, object]:
    """The LFS basic ``actions``: one headerless presigned PUT to ``key``."""
    ttl = ctx.settings.presign_ttl_seconds
    url, _ = ctx.store.presign_put(key, ttl)
    return {"upload": {"href": url, "expires_in": ttl}}


def _carrier_path(sha256: str) -> str:
    return f"lfs/{sha256}"


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def complete_multipart(
    ctx: Context,
    repo_id: str,
    carrier_id: str,
    sha256: str,
    token: str,
    payload: object,
    *,
    principal: Principal | None,
) -> None:
    """The Hub's multipart completion (``POST href`` with ``{"oid", "parts": [{"partNumber", "etag"}]}``):
    check that every part 1..N is named once, in order, with the etag and size the store holds, then
    complete the S3 multipart upload into the carrier's staging key; the NDJSON commit verifies the
    bytes like any staged object. The Hub's client sends no token here, so the URL's ``token`` (one per
    carrier, stored hashed) is the capability; a token sent anyway must be the carrier's tenant's.
    Anything else (another tenant's carrier, a wrong token, another repo, an expired or closed carrier)
    is the same ``EntryNotFound``. Idempotent. Workflow."""
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        row = _multipart_row(session, repo_id, carrier_id, _check_sha(sha256), token, principal, now)
        if row.received:
            return  # completed before: the client lost the answer
        key, mpu, size = row.staging_key or "", row.multipart_upload_id or "", row.size_bytes
    part_size, count = multipart_plan(size, ctx.settings.part_size_bytes)
    etags = _completion_etags(payload, sha256, count)
    stored = {int(p["PartNumber"]): p for p in ctx.store.list_parts(key, mpu)}
    for n, etag in enumerate(etags, 1):
        part = stored.get(n)
        if part is None:
            raise InvalidRequest(f"lfs multipart {sha256}: part {n} of {count} was never uploaded")
        if str(part["ETag"]).strip('"') != etag.strip('"'):
            raise InvalidRequest(f"lfs multipart {sha256}: part {n}'s etag {etag[:80]!r} is not the etag of the part uploaded")
        want = part_size if n < count else size - part_size * (count - 1)
        if int(part["Size"]) != want:
            raise InvalidRequest(f"lfs multipart {sha256}: part {n} holds {part['Size']} bytes, {want} expected")
    ctx.store.complete_multipart(key, mpu, [stored[n] for n in range(1, count + 1)])
    with session_scope(ctx.engine) as session:
        done = session.get(UploadFile, (carrier_id, _carrier_path(sha256)))
        if done is not None:
            done.received, done.multipart_upload_id = True, None
            session.add(done)


def _multipart_row(
    session: Session, repo_id: str, carrier_id: str, sha256: str, token: str, principal: Principal | None, now: datetime
) -> UploadFile:
    carrier = session.get(Upload, carrier_id)
    row = session.get(UploadFile, (carrier_id, _carrier_path(sha256))) if carrier is not None else None
    digests = (carrier.user_metadata or {}).get(TOKEN_META, "").split() if carrier is not None else []
    token_ok = any([hmac.compare_digest(d, _token_digest(token)) for d in digests])  # a list: compare each
    namespace, name = hub.split_repo_id(repo_id)
    run = hub.find_run(session, namespace, name)
    if (
        carrier is None
        or row is None
        or carrier.kind != CARRIER_KIND
        or carrier.state != UploadState.open
        or carrier.expires_at <= now
        or not token_ok
        or (principal is not None and principal.tenant_id != carrier.tenant_id)
        or run is None
        or run.id != carrier.run_id
        or (row.multipart_upload_id is None and not row.received)
    ):
        raise hub.EntryNotFound(
            f"no open multipart upload {carrier_id[:80]}/{sha256} in {repo_id} (expired, committed, or not yours)"
        )
    return row


def _completion_etags(payload: object, sha256: str, count: int) -> list[str]:
    """The etags of parts 1..``count`` from a completion body, refusing any other shape."""
    parts = payload.get("parts") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or payload.get("oid") != sha256 or not isinstance(parts, list):
        raise InvalidRequest(f"lfs multipart completion: expected {{'oid': {sha256!r}, 'parts': [...]}}")
    etags: list[str] = []
    for i, part in enumerate(parts, 1):
        number = part.get("partNumber") if isinstance(part, dict) else None
        etag = part.get("etag") if isinstance(part, dict) else None
        if number != i or not isinstance(etag, str) or not etag:
            raise InvalidRequest(f"lfs multipart completion: entry {i} must be part {i} with its etag (got {str(part)[:120]})")
        etags.append(etag)
    if len(etags) != count:
        raise InvalidRequest(f"lfs multipart completion: {sha256} has {count} parts, {len(etags)} named")
    return etags


def _check_sha(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidRequest(f"oid must be a sha256 (64 lowercase hex), got {value[:80]!r}")
    return value


# --- commit ------------------------------------------------------------------------------------------


@dataclass
class _Folder:
    """One ``SEG/NAME`` folder of a commit: one checkpoint."""

    kind: str
    name: str
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    """path inside the checkpoint → (size, sha256)"""
    inline: dict[str, bytes] = field(default_factory=dict)
    deleted: list[tuple[str, bool]] = field(default_factory=list)
    """paths inside the checkpoint to delete (``files`` only): (path, is a folder)"""


@dataclass(frozen=True)
class ParsedCommit:
    folders: dict[str, _Folder]
    deleted: list[str]
    """whole checkpoints deleted (``deletedFolder`` of ``SEG/NAME`` or ``FOLDER``)"""


def parse_commit(settings_name_max: int, lines: Iterable[bytes]) -> ParsedCommit:
    """Parse and validate an NDJSON commit body (header, ``file``, ``lfsFile``, ``deletedFile``,
    ``deletedFolder``). Deleting inside a Tinker-kind checkpoint is refused here, before anything is
    stored: those never change (delete the whole ``SEG/NAME`` folder instead)."""
    folders: dict[str, _Folder] = {}
    deleted: list[str] = []
    for n, raw in enumerate(lines):
        if n >= MAX_COMMIT_LINES:
            raise InvalidRequest(f"a commit holds at most {MAX_COMMIT_LINES} operations")
        if not raw.strip():
            continue
        item = formats.parse_json(raw, max_bytes=INLINE_MAX_BYTES, name=f"commit line {n + 1}")
        key, value = (item.get("key"), item.get("value")) if isinstance(item, dict) else (None, None)
        if not isinstance(value, dict):
            raise InvalidRequest(f"commit line {n + 1}: expected {{'key': ..., 'value': {{...}}}}")
        if key == "header":
            continue
        path = value.get("path")
        if not isinstance(path, str):
            raise InvalidRequest(f"commit line {n + 1}: no path")
        if key in ("deletedFile", "deletedFolder"):
            _parse_delete(path, key == "deletedFolder", settings_name_max, folders, deleted)
            continue
        if key not in ("file", "lfsFile"):
            raise InvalidRequest(f"commit line {n + 1}: {key!r} is not supported (checkpoint files never change)")
        folder_id, kind, name, rest = _folder_of(path, settings_name_max)
        folder = folders.setdefault(folder_id, _Folder(kind, name))
        if rest in folder.files:
            raise InvalidRequest(f"{path}: named twice in one commit")
        if key == "file":
            data = _inline_bytes(path, value)
            folder.inline[rest] = data
            folder.files[rest] = (len(data), hashlib.sha256(data).hexdigest())
        else:
            oid, size = value.get("oid"), value.get("size")
            if not isinstance(oid, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidRequest(f"{path}: an lfsFile needs its oid and size")
            folder.files[rest] = (size, _check_sha(oid))
    both = sorted(set(deleted) & set(folders))
    if both:
        raise InvalidRequest(f"{both[0]}: deleted and written in one commit")
    return ParsedCommit(folders, deleted)


def _parse_delete(path: str, is_folder: bool, name_max: int, folders: dict[str, _Folder], deleted: list[str]) -> None:
    """A ``deletedFolder`` naming a whole checkpoint deletes it; anything inside one (a file, a
    subfolder) is a new version of a ``files`` checkpoint without it, and refused for the Tinker kinds."""
    clean = path.strip("/")
    if not clean:
        raise InvalidRequest("deleting the whole repo is not supported: delete its checkpoints (folders)")
    parts = clean.split("/")
    whole = len(parts) == (1 if KIND_BY_SEGMENT.get(parts[0]) in (None, hub.FILES_KIND) else 2)
    if is_folder and whole:
        deleted.append(_folder_of(clean + "/x", name_max)[0])
        return
    folder_id, kind, name, rest = _folder_of(clean + "/x" if is_folder else clean, name_max)
    if kind != hub.FILES_KIND:
        raise InvalidRequest(
            f"{clean[:300]!r} is inside {folder_id}, a checkpoint that never changes: delete the whole "
            f"folder (delete_folder('{folder_id}')) or push a new name"
        )
    if is_folder:
        rest = rest[: -len("/x")] if rest != "x" else ""
    folders.setdefault(folder_id, _Folder(kind, name)).deleted.append((rest, is_folder))


def _inline_bytes(path: str, value: dict[str, Any]) -> bytes:
    content, encoding = value.get("content"), value.get("encoding", "base64")
    if not isinstance(content, str) or encoding != "base64":
        raise InvalidRequest(f"{path}: inline content must be base64")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{path}: inline content is not valid base64") from exc


def _folder_of(path: str, name_max: int) -> tuple[str, str, str, str]:
    """A pushed path → (folder = the checkpoint's revision, kind, name, path inside it), module doc:
    ``SEG/NAME/rest`` for the Tinker kinds, ``FOLDER/rest`` → ``files/FOLDER``, a root file →
    ``files/root``."""
    parts = path.split("/")
    check_file_path(path)
    segment_kind = KIND_BY_SEGMENT.get(parts[0])
    if segment_kind is not None and segment_kind != hub.FILES_KIND:
        if segment_kind not in PUSHABLE_KINDS or len(parts) < 3:
            raise InvalidRequest(
                f"{path[:300]!r}: under {parts[0]}/ only sampler_weights/NAME/... (sampler checkpoint) and "
                "weights/NAME/... (full state) can be pushed; exports are made by weightstore"
            )
        name = check_name(parts[1], max_length=name_max)
        return f"{parts[0]}/{name}", segment_kind, name, "/".join(parts[2:])
    if parts[0] in (hub.FILES_KIND, hub.ROOT_FOLDER) and len(parts) > 1:
        raise InvalidRequest(f"{path[:300]!r}: the top-level folders files/ and root/ are reserved")
    if len(parts) == 1:
        return f"{hub.FILES_KIND}/{hub.ROOT_FOLDER}", hub.FILES_KIND, hub.ROOT_FOLDER, path
    name = check_name(parts[0], max_length=name_max)
    return f"{hub.FILES_KIND}/{name}", hub.FILES_KIND, name, "/".join(parts[1:])


@dataclass(frozen=True)
class CommitAnswer:
    commit: str
    """The run's ``main`` commit id after the push."""
    checkpoints: list[str]
    """``tinker://`` paths committed, in order."""
    bytes_received: int


def commit(ctx: Context, principal: Principal, repo_id: str, revision: str, body: bytes) -> CommitAnswer:
    """The NDJSON commit (module doc). Workflow: validate everything, then one native upload per folder,
    then the deletions."""
    principal.require_write()
    if len(body) > INLINE_MAX_BYTES:
        raise InvalidRequest(f"a commit body may hold at most {INLINE_MAX_BYTES} bytes (large files go through LFS)")
    with session_scope(ctx.engine) as session:
        run_id = own_run(session, principal, repo_id).id
    _require_main(revision)
    parsed = parse_commit(ctx.settings.name_max_length, body.splitlines())
    now = ctx.clock.now()
    requests: list[tuple[_Folder, uploads.UploadRequest]] = []
    emptied: list[str] = []
    with session_scope(ctx.engine) as session:
        files_ttl = retention.tenant_default_ttl(session, principal.tenant_id, "training")
        for folder_id, f in parsed.folders.items():
            overwrite, ttl = False, None
            if f.kind == hub.FILES_KIND:
                # A Hub push adds to a folder: the files it does not name stay (the tenant holds them,
                # so they move no byte) unless deleted; the folder becomes a new version of the checkpoint.
                old = publish.existing_committed(session, TinkerPath(run_id, f.kind, f.name))
                visible = old is not None and checkpoints.is_visible(old, now)
                kept = {k.path: (k.size_bytes, k.sha256) for k in checkpoints.files_of(session, old)} if old and visible else {}
                for path in _apply_deletes(folder_id, kept, f.deleted):
                    f.files.setdefault(path, kept[path])
                overwrite, ttl = old is not None, files_ttl  # an expired one still holds the name
                if not f.files:
                    emptied.append(folder_id)  # every file deleted: the folder goes, as on the Hub
                    continue
            requests.append(
                (
                    f,
                    uploads.UploadRequest(
                        run_id=run_id,
                        kind=f.kind,
                        name=f.name,
                        files=[uploads.DeclaredFile(p, size, sha) for p, (size, sha) in sorted(f.files.items())],
                        ttl_seconds=ttl,
                        overwrite=overwrite,
                        transfer="stream",  # nothing presigned: every byte is already staged (_push_folder)
                    ),
                )
            )
    for _, req in requests:
        uploads.validate_request(ctx.settings, req)  # every folder before any is stored
    done: list[str] = []
    received = 0
    for folder, req in requests:
        result = _push_folder(ctx, principal, req, folder.inline)
        done.append(result.tinker_path)
        received += result.bytes_received
        _adopt_base_model(ctx, principal, req, folder.inline)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        for folder_id in parsed.deleted + emptied:
            checkpoints.delete(session, principal, TinkerPath.from_checkpoint_id(run_id, folder_id), now=now)
    with session_scope(ctx.engine) as session:
        main = hub.snapshot(session, principal, repo_id, hub.MAIN, now=now).commit
    return CommitAnswer(main, done, received)


def _adopt_base_model(ctx: Context, principal: Principal, req: uploads.UploadRequest, inline: dict[str, bytes]) -> None:
    """A ``create_repo`` run takes its base model (and LoRA rank) from the first committed
    ``adapter_config.json`` that names a Hub model id (module doc). The file was validated by the
    commit (JSON, ``r`` and ``lora_alpha``), so it is read back from its blob, at most
    ``max_json_file_bytes``."""
    entry = next((f for f in req.files if f.path == formats.ADAPTER_CONFIG), None)
    if entry is None or entry.size_bytes > ctx.settings.max_json_file_bytes:
        return
    with session_scope(ctx.engine) as session:
        run = session.get(TrainingRun, req.run_id)
        if run is None or run.base_model != UNKNOWN_BASE:
            return
    data = inline.get(entry.path)
    if data is None:
        data = ctx.store.read_range(blob_key(entry.sha256), 0, entry.size_bytes)
    try:
        cfg = formats.parse_json_file(data, name=entry.path, max_bytes=ctx.settings.max_json_file_bytes)
    except WeightstoreError:
        return
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    parts = base.split("/") if isinstance(base, str) and len(base) <= runs.MAX_BASE_MODEL_CHARS else []
    if not 1 <= len(parts) <= 2 or not all(hub.is_repo_part(p) for p in parts):
        return  # not a Hub model id: absent, a local path, ...
    rank = cfg.get("r")
    with session_scope(ctx.engine) as session:
        run = runs.lock_for_write(session, principal.tenant_id, req.run_id)
        if run.base_model != UNKNOWN_BASE:
            return  # another push adopted one first
        run.base_model = "/".join(parts)
        if run.lora_rank is None and isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= runs.MAX_LORA_RANK:
            run.lora_rank = rank
        session.add(run)


def _apply_deletes(folder_id: str, files: dict[str, tuple[int, str]], deletes: list[tuple[str, bool]]) -> list[str]:
    """The paths of ``files`` left after ``deletes``; a deletion that matches nothing is ``EntryNotFound``
    (the Hub's answer for ``delete_file`` of a missing file)."""
    left = set(files)
    for rest, is_folder in deletes:
        gone = {p for p in left if p.startswith(rest + "/")} if is_folder else {rest} & left
        if is_folder and not rest:
            gone = set(left)
        if not gone:
            shown = f"{folder_id}/{rest}" if rest else folder_id
            raise hub.EntryNotFound(f"{shown[:300]!r} not found in the current version of {folder_id}")
        left -= gone
    return sorted(left)


def _open_carrier_rows(tenant_id: str, shas: list[str]) -> SelectOfScalar[UploadFile]:
    """The tenant's own open carrier rows for ``shas`` that no multipart upload is still filling."""
    return (
        select(UploadFile)
        .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
        .where(
            Upload.tenant_id == tenant_id,
            Upload.kind == CARRIER_KIND,
            Upload.state == UploadState.open,
            col(UploadFile.sha256).in_(shas),
            col(UploadFile.multipart_upload_id).is_(None),
        )
    )


def _staged_carrier_rows(session: Session, tenant_id: str, shas: list[str], now: datetime) -> dict[str, UploadFile]:
    """Per sha256, the tenant's own open carrier row reserving it whose object is (or may be) staged:
    a basic PUT's, or a completed multipart's (newest received first); never another tenant's."""
    if not shas:
        return {}
    rows = session.exec(
        _open_carrier_rows(tenant_id, shas)
        .where(col(Upload.expires_at) > now)
        .order_by(col(UploadFile.received).desc(), col(Upload.created_at).desc())
    ).all()
    best: dict[str, UploadFile] = {}
    for r in rows:
        best.setdefault(r.sha256, r)
    return best


class _CarrierHandover:
    """``uploads.Handover`` for one folder's declare: per sha256 the tenant's own open carrier row
    whose object is staged (basic, or multipart completed; newest first; never another tenant's).
    ``take`` deletes those rows (the upload's own rows reserve the bytes from then on) and remembers
    their staging keys. The carriers stay open, so the collector keeps their staging objects, until
    ``close_emptied``."""

    def __init__(self, tenant_id: str, sizes: dict[str, int], now: datetime) -> None:
        self.tenant_id, self.sizes, self.now = tenant_id, sizes, now
        self.keys: dict[str, str] = {}
        self.carriers: set[str] = set()

    def _rows(self, session: Session, shas: list[str]) -> dict[str, UploadFile]:
        return _staged_carrier_rows(session, self.tenant_id, sorted(set(shas) & set(self.sizes)), self.now)

    def __call__(self, session: Session, shas: list[str], take: bool) -> int:
        rows = self._rows(session, shas)
        if take:
            self.keys = {sha: r.staging_key or "" for sha, r in rows.items()}
            self.carriers |= {r.upload_id for r in rows.values()}
            for r in rows.values():
                session.execute(
                    sa.delete(UploadFile).where(col(UploadFile.upload_id) == r.upload_id, col(UploadFile.path) == r.path)
                )
        return sum(min(r.size_bytes, self.sizes[sha]) for sha, r in rows.items())

    def close_emptied(self, ctx: Context) -> None:
        """Close the carriers this handover emptied: the collector then reclaims their staging area
        (a committed object was already copied into place)."""
        if not self.carriers:
            return
        with session_scope(ctx.engine) as session:
            for cid in sorted(self.carriers):
                left = session.exec(select(UploadFile.path).where(UploadFile.upload_id == cid).limit(1)).first()
                up = session.get(Upload, cid)
                if left is None and up is not None and up.state == UploadState.open:
                    up.state = UploadState.aborted  # closed: nothing of its own to commit
                    session.add(up)


def _push_folder(
    ctx: Context, principal: Principal, req: uploads.UploadRequest, inline: dict[str, bytes]
) -> uploads.CommitResult:
    """One folder → one checkpoint: declare (taking over the carriers' reservations), point every file
    to send at its staged object (a carrier's, or for an inline file this upload's own key), commit."""
    inline_shas = {hashlib.sha256(b).hexdigest() for b in inline.values()}
    sizes = {f.sha256: f.size_bytes for f in req.files if f.path not in inline and f.sha256 not in inline_shas}
    handover = _CarrierHandover(principal.tenant_id, sizes, ctx.clock.now())
    answer = uploads.declare(ctx, principal, req, handover=handover)
    try:
        to_send = [f for f in answer.files if f.transfer != "present"]
        sources: dict[str, str] = {}
        for f in to_send:
            if f.path in inline:
                key = uploads.resend_key(answer.upload_id, f.path)
                ctx.store.put_bytes(key, inline[f.path], sha256=f.sha256)
                sources[f.path] = key
            elif f.sha256 in handover.keys:
                sources[f.path] = handover.keys[f.sha256]
            else:
                raise UploadIncomplete(f"{f.path}: its bytes were not sent (LFS batch and upload first)", files=[f.path])
        with session_scope(ctx.engine) as session:
            for path, key in sources.items():
                row = session.get(UploadFile, (answer.upload_id, path))
                assert row is not None
                row.transfer, row.staging_key, row.multipart_upload_id = "presigned", key, None
                session.add(row)
        result = uploads.commit(ctx, principal, answer.upload_id)
    except WeightstoreError:
        try:
            uploads.abort(ctx, principal, answer.upload_id)
        except WeightstoreError:
            pass  # already closed; the collector reclaims what is left
        raise
    finally:
        handover.close_emptied(ctx)
    _release_carriers(ctx, principal.tenant_id, [f.sha256 for f in to_send])
    return result


def _release_carriers(ctx: Context, tenant_id: str, shas: list[str]) -> None:
    """Drop the tenant's other carrier rows for bytes now committed (held: any later push of them is
    answered present), so their quota reservation ends; a carrier left with no rows is closed, so the
    collector reclaims its staging area. A multipart upload still in flight keeps its row until its
    carrier expires (its client may still complete it)."""
    if not shas:
        return
    with session_scope(ctx.engine) as session:
        rows = session.exec(_open_carrier_rows(tenant_id, shas)).all()
        carriers = {r.upload_id for r in rows}
        for r in rows:
            session.delete(r)
        session.flush()
        for cid in carriers:
            left = session.exec(select(UploadFile.path).where(UploadFile.upload_id == cid).limit(1)).first()
            up = session.get(Upload, cid)
            if left is None and up is not None:
                up.state = UploadState.aborted  # closed: nothing of its own to commit
                session.add(up)


def ndjson_header(body: bytes) -> dict[str, Any]:
    """The header line's value (summary, description), for the answer; empty when absent."""
    first = body.split(b"\n", 1)[0]
    try:
        item = json.loads(first)
    except ValueError:
        return {}
    value = item.get("value") if isinstance(item, dict) and item.get("key") == "header" else None
    return value if isinstance(value, dict) else {}
