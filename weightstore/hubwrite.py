"""The Hugging Face Hub *write* side: ``create_repo``, preupload, the LFS batch and the NDJSON commit
(issue 15, part 2), all on top of the native upload protocol (``weightstore.uploads``).

Mapping (the README's "push" table):

| pushed to ``main``             | becomes (``tinker://tenant:x/...``)       | served back as (revision, or in ``main``) |
|--------------------------------|-------------------------------------------|-------------------------------------------|
| ``create_repo("tenant/x")``    | run ``tenant:x`` (base model "unknown")   | repo ``tenant/x``                         |
| ``sampler_weights/NAME/...``   | sampler checkpoint                        | ``sampler_weights/NAME``                  |
| ``weights/NAME/...``           | full-state checkpoint                     | ``weights/NAME``                          |
| ``FOLDER/...``                 | ``files`` checkpoint ``files/FOLDER``     | ``files/FOLDER``; ``main``'s ``FOLDER/``  |
| a root file (``config.json``)  | ``files`` checkpoint ``files/root``       | ``files/root``; ``main``'s root           |
| an export's segment, ``root/``, ``files/``, another revision | refused (400) | nothing stored                |

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
no commit). A ``deletedFolder`` of ``SEG/NAME`` deletes that checkpoint (the native delete). TTL is
the tenant's default for the kind, billing the native one (the ledger's ``commit`` event), quota
the same check as a declare.

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
- the commit declares each checkpoint natively (``uploads.declare``, transfer ``presigned``) and
  points each file the declare wants sent at the carrier's staging object (or, for an inline file,
  at this upload's own staging key, written by the service). ``uploads.commit`` then verifies it
  like any staged file (size, then sha256 re-read unless the store kept the checksum), copies it
  to its blob key and commits. Only the pushing tenant's own carriers are searched, so a commit can
  never borrow another tenant's bytes. The consumed carrier rows are released at once (the quota
  stops counting them twice).
Objects above one presigned PUT (``single_put_limit``, 5 GiB) are refused per object in the batch
answer: the Hub's ``multipart`` transfer is not offered yet.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from weightstore import checkpoints, formats, hub, publish, retention, runs, tenants, uploads
from weightstore.auth import Principal
from weightstore.blobs import single_put_limit
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import InvalidRequest, UploadIncomplete, WeightstoreError
from weightstore.models import TrainingRun, Upload, UploadFile, UploadState
from weightstore.names import KIND_BY_SEGMENT, TinkerPath, check_file_path, check_name, check_run_id, new_id
from weightstore.objectstore import staging_key

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


def lfs_batch(ctx: Context, principal: Principal, repo_id: str, objects: list[dict[str, Any]]) -> list[dict[str, object]]:
    """The LFS batch answer (module doc): held objects with no actions, the others a headerless
    presigned PUT to a staging key of one carrier upload. Workflow."""
    principal.require_write()
    wanted: dict[str, int] = {}
    for o in objects:
        oid, size = o.get("oid"), o.get("size")
        if not isinstance(oid, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest("lfs batch: every object needs an oid (sha256) and a size")
        wanted[_check_sha(oid)] = size
    now = ctx.clock.now()
    limit = single_put_limit(ctx.settings)
    with session_scope(ctx.engine) as session:
        run = own_run(session, principal, repo_id)
        held = uploads.held_blobs(session, principal.tenant_id, list(wanted))
        send = {sha: size for sha, size in wanted.items() if sha not in held and size <= limit}
        if send:
            tenants.check_quota(session, principal.tenant_id, sum(send.values()), now=now, lock=True)
            carrier = Upload(
                id=new_id("upl"),
                tenant_id=principal.tenant_id,
                run_id=run.id,
                kind=CARRIER_KIND,
                name=CARRIER_NAME,
                created_at=now,
                expires_at=now + timedelta(seconds=ctx.settings.upload_expiry_seconds),
            )
            session.add(carrier)
            session.flush()
            for sha, size in send.items():
                session.add(
                    UploadFile(
                        upload_id=carrier.id,
                        path=f"lfs/{sha}",
                        size_bytes=size,
                        sha256=sha,
                        transfer="presigned",
                        staging_key=staging_key(carrier.id, sha),
                    )
                )
            carrier_id = carrier.id
    answers: list[dict[str, object]] = []
    for sha, size in wanted.items():
        entry: dict[str, object] = {"oid": sha, "size": size}
        if sha in send:
            url, _ = ctx.store.presign_put(staging_key(carrier_id, sha), ctx.settings.presign_ttl_seconds)
            entry["actions"] = {"upload": {"href": url, "expires_in": ctx.settings.presign_ttl_seconds}}
        elif sha not in held:
            entry["error"] = {"code": 422, "message": f"{size} bytes is more than one PUT ({limit}); multipart is not offered"}
        answers.append(entry)
    return answers


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


@dataclass(frozen=True)
class ParsedCommit:
    folders: dict[str, _Folder]
    deleted: list[str]


def parse_commit(settings_name_max: int, lines: Iterable[bytes]) -> ParsedCommit:
    """Parse and validate an NDJSON commit body (header, ``file``, ``lfsFile``, ``deletedFolder``)."""
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
        if key == "deletedFolder":
            deleted.append(_folder_of(path.strip("/") + "/x", settings_name_max)[0])
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
    return ParsedCommit(folders, deleted)


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
    """The NDJSON commit (module doc). Workflow: validate everything, then one native upload per folder."""
    principal.require_write()
    if len(body) > INLINE_MAX_BYTES:
        raise InvalidRequest(f"a commit body may hold at most {INLINE_MAX_BYTES} bytes (large files go through LFS)")
    with session_scope(ctx.engine) as session:
        run_id = own_run(session, principal, repo_id).id
    _require_main(revision)
    parsed = parse_commit(ctx.settings.name_max_length, body.splitlines())
    now = ctx.clock.now()
    requests: list[uploads.UploadRequest] = []
    with session_scope(ctx.engine) as session:
        files_ttl = retention.tenant_default_ttl(session, principal.tenant_id, "training")
        for f in parsed.folders.values():
            overwrite, ttl = False, None
            if f.kind == hub.FILES_KIND:
                # A Hub push adds to a folder: the files it does not name stay (the tenant holds them,
                # so they move no byte); the folder becomes a new version of the checkpoint.
                old = publish.existing_committed(session, TinkerPath(run_id, f.kind, f.name))
                if old is not None and checkpoints.is_visible(old, now):
                    for kept in checkpoints.files_of(session, old):
                        f.files.setdefault(kept.path, (kept.size_bytes, kept.sha256))
                    overwrite = True
                elif old is not None:
                    overwrite = True  # an expired one still holds the name
                ttl = files_ttl
            requests.append(
                uploads.UploadRequest(
                    run_id=run_id,
                    kind=f.kind,
                    name=f.name,
                    files=[uploads.DeclaredFile(p, size, sha) for p, (size, sha) in sorted(f.files.items())],
                    ttl_seconds=ttl,
                    overwrite=overwrite,
                    transfer="presigned",
                )
            )
    for req in requests:
        uploads.validate_request(ctx.settings, req)  # every folder before any is stored
    done: list[str] = []
    received = 0
    for folder, req in zip(parsed.folders.values(), requests, strict=True):
        result = _push_folder(ctx, principal, req, folder.inline)
        done.append(result.tinker_path)
        received += result.bytes_received
    now = ctx.clock.now()
    with session_scope(ctx.engine) as session:
        for folder_id in parsed.deleted:
            checkpoints.delete(session, principal, TinkerPath.from_checkpoint_id(run_id, folder_id), now=now)
    with session_scope(ctx.engine) as session:
        main = hub.snapshot(session, principal, repo_id, hub.MAIN, now=now).commit
    return CommitAnswer(main, done, received)


def _push_folder(
    ctx: Context, principal: Principal, req: uploads.UploadRequest, inline: dict[str, bytes]
) -> uploads.CommitResult:
    answer = uploads.declare(ctx, principal, req)
    try:
        to_send = [f for f in answer.files if f.transfer != "present"]
        now = ctx.clock.now()
        sources: dict[str, str] = {}
        with session_scope(ctx.engine) as session:
            for f in to_send:
                if f.path in inline:
                    continue
                key = _carrier_key(session, principal.tenant_id, f.sha256, now)
                if key is None:
                    raise UploadIncomplete(f"{f.path}: its bytes were not sent (LFS batch first)", files=[f.path])
                sources[f.path] = key
        for f in to_send:
            if f.path in inline:
                key = uploads.resend_key(answer.upload_id, f.path)
                ctx.store.put_bytes(key, inline[f.path], sha256=f.sha256)
                sources[f.path] = key
        with session_scope(ctx.engine) as session:
            for path, key in sources.items():
                row = session.get(UploadFile, (answer.upload_id, path))
                assert row is not None
                row.staging_key = key
                session.add(row)
        result = uploads.commit(ctx, principal, answer.upload_id)
    except WeightstoreError:
        try:
            uploads.abort(ctx, principal, answer.upload_id)
        except WeightstoreError:
            pass  # already closed; the collector reclaims what is left
        raise
    _release_carriers(ctx, principal.tenant_id, [f.sha256 for f in to_send])
    return result


def _carrier_key(session: Session, tenant_id: str, sha256: str, now: datetime) -> str | None:
    """The staging key of this tenant's newest open carrier holding ``sha256`` (never another tenant's)."""
    row = session.exec(
        select(UploadFile.staging_key)
        .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
        .where(
            Upload.tenant_id == tenant_id,
            Upload.kind == CARRIER_KIND,
            Upload.state == UploadState.open,
            col(Upload.expires_at) > now,
            UploadFile.sha256 == sha256,
        )
        .order_by(col(Upload.created_at).desc())
        .limit(1)
    ).first()
    return row


def _release_carriers(ctx: Context, tenant_id: str, shas: list[str]) -> None:
    """Drop the carrier rows whose bytes are now committed (their quota reservation ends); a carrier
    left with no rows is closed, so the collector reclaims its staging area."""
    if not shas:
        return
    with session_scope(ctx.engine) as session:
        rows = session.exec(
            select(UploadFile)
            .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
            .where(
                Upload.tenant_id == tenant_id,
                Upload.kind == CARRIER_KIND,
                Upload.state == UploadState.open,
                col(UploadFile.sha256).in_(shas),
            )
        ).all()
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
