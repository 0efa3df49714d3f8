"""Export jobs: queued rows that turn a raw checkpoint into a PEFT adapter or a merged HF model.

Life of a job (``export_job.state``, an ``ExportJobState``; the collector reads the same enum)::

    queued ──claim──▶ running ──▶ succeeded
      ▲                  │ ├────▶ failed      (permanent error, verification failure, attempts used up)
      └── transient ─────┘ └────▶ cancelled   (cancel(); the worker notices at its next heartbeat)
          error: back to queued with ``not_before`` (exponential backoff)

Rules that keep several workers on several machines from doing one job twice:

- **Claim** is one conditional ``UPDATE ... WHERE id = :id AND (state = 'queued' AND not_before
  has passed OR state = 'running' AND lease_expires_at < now)``: the database lets exactly one
  claimant's UPDATE match (row lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite). A crashed
  worker's job is claimed again once its lease has expired.
- **Heartbeat** extends the lease only while ``lease_owner`` is still us and the job still
  ``running``; otherwise the worker stops (cancelled, or taken over after a stall).
- **Publish** is fenced: the output is published with ``publish.publish_files`` (verified blob
  writes, then one manifest transaction), and that transaction also runs the conditional
  ``UPDATE`` that marks the job ``succeeded`` (still ours, still running). A worker that lost its
  lease rolls the whole commit back, so one job never yields two outputs.
- **Quota** (issue 12, part 2): the output is new logical bytes of the tenant. Checked twice through
  ``tenants.check_quota``: at submission against ``estimated_output_bytes`` (a lower bound, so an
  export is never refused there for bytes it would not write; unlocked, nothing is reserved), and
  exactly when the output is published (``publish.add_checkpoint``, under the tenant row lock). A
  refusal at publish ends the job ``failed`` with the ``quota_exceeded`` error (permanent, never
  retried); asking again after freeing room queues it once more.
- **Same request twice** returns the same job: ``request_key`` is a hash of (tenant, source
  checkpoint, target, base model, output name, options) and unique in the table.

Transactions: ``submit``, ``submit_batch``, ``claim`` and ``heartbeat`` are workflows because
their outcome must be committed before the caller goes on (a claimed job is run, a heartbeat
extends the lease; ``submit`` retries once in a fresh transaction when an identical submission
raced it). ``run_job`` is a workflow; the read and cancel functions are catalog functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select

from weightstore import audit, basemodels, blobs, checkpoints, formats, publish, retention, tenants
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import (
    ExportFailed,
    InvalidRequest,
    LeaseLost,
    NotFound,
    TransientError,
    WeightstoreError,
)
from weightstore.models import BaseModel, Checkpoint, ExportJob, ExportJobState, Role, TrainingRun
from weightstore.names import TinkerPath, check_name, new_id

log = logging.getLogger(__name__)

TARGETS = {"peft": "external", "merged": "merged"}
"""Export target → kind of the output checkpoint (``external_weights`` is what Tinker serves)."""
SOURCE_KINDS = ("sampler", "training")
LOST = "lost"
"""What ``run_job`` returns when the job was cancelled or taken over (not a state: the row is someone else's)."""
MAX_ATTEMPTS = 5
"""Claims per job before a transient failure becomes permanent (a crash-looping job stops)."""
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
MAX_BATCH = 1000
PROGRESS_EVERY_BYTES = 8 * 1024 * 1024


def backoff_seconds(attempt: int) -> float:
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempt - 1)))


def default_owner() -> str:
    return f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"


# --- submit -----------------------------------------------------------------------------------


def _request_key(tenant_id: str, source_id: str, target: str, base: str, output_name: str | None, options: dict[str, Any]) -> str:
    raw = json.dumps([tenant_id, source_id, target, base, output_name, options], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise InvalidRequest(f"target must be one of {', '.join(sorted(TARGETS))}, got {target!r}")


def _check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    allowed = {"ttl_seconds", "shard_bytes"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown export option(s): {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    if "shard_bytes" in options and (not isinstance(options["shard_bytes"], int) or options["shard_bytes"] < 1024 * 1024):
        raise InvalidRequest("shard_bytes must be an integer of at least 1 MiB")
    return options


def _submit_one(
    session: Session,
    ctx: Context,
    principal: Principal,
    source: Checkpoint,
    *,
    target: str,
    base_model: str | None,
    output_name: str | None,
    options: dict[str, Any],
    batch_id: str | None,
    now: datetime,
) -> ExportJob:
    if source.kind not in SOURCE_KINDS:
        raise InvalidRequest(
            f"{checkpoints.tinker_path(source)}: only sampler and full-state checkpoints can be "
            f"exported (this one is {source.kind})"
        )
    if checkpoints.layouts(session, [source])[source.id] == "dcp":  # a LoRA adapter saved by DCP (dcp_lora)
        from weightstore.integrations.dcp_lora import check_exportable

        check_exportable([f.path for f in checkpoints.files_of(session, source)])
    run = session.get(TrainingRun, source.run_id)
    base = base_model or (run.base_model if run else None)
    if not base:
        raise InvalidRequest("no base model given and the run names none")
    base_row = basemodels.get(session, base)  # NotFound lists the registered ones
    if output_name is not None:
        check_name(output_name, max_length=ctx.settings.name_max_length)
    if "ttl_seconds" in options:
        retention.check_ttl(ctx.settings, options["ttl_seconds"])
    key = _request_key(principal.tenant_id, source.id, target, base, output_name, options)
    existing = session.exec(select(ExportJob).where(ExportJob.request_key == key)).first()
    if (
        existing is None
        or existing.state in (ExportJobState.failed, ExportJobState.cancelled)
        or (existing.state == ExportJobState.succeeded and not _result_visible(session, existing, now))
    ):  # a job will run: refuse early what cannot fit (module doc)
        estimate = estimated_output_bytes(session, target, base_row)
        tenants.check_quota(session, principal.tenant_id, estimate, now=now, lock=False)
    if existing is not None:
        if existing.state in (ExportJobState.failed, ExportJobState.cancelled) or (
            existing.state == ExportJobState.succeeded and not _result_visible(session, existing, now)
        ):
            # Asking again for something that did not produce a usable result is a retry, not a
            # duplicate: the same job is queued once more.
            _requeue(existing, now)
            session.add(existing)
        return existing
    job = ExportJob(
        id=new_id("exp"),
        tenant_id=principal.tenant_id,
        batch_id=batch_id,
        source_checkpoint_id=source.id,
        target=target,
        base_model=base,
        options=options or None,
        request_key=key,
        output_name=output_name or _default_output_name(source),
        state=ExportJobState.queued,
        total_bytes=source.size_bytes,
        created_at=now,
    )
    session.add(job)
    session.flush()
    audit.record(
        session,
        at=now,
        action="export.submit",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=checkpoints.tinker_path(source),
        job_id=job.id,
        export_target=target,
        base_model=base,
    )
    return job


def estimated_output_bytes(session: Session, target: str, base: BaseModel) -> int:
    """A lower bound of an export's output size, for the quota check at submission. A merged model
    holds every tensor of the base in the base's dtype, so at least the base's top-level
    ``*.safetensors`` bytes; a PEFT adapter's size depends on the conversion (ranks, dtype), so 0:
    only the exact check at publish applies to it."""
    if target != "merged":
        return 0
    files = basemodels.files_of(session, base.name)
    return sum(f.size_bytes for f in files if "/" not in f.path and f.path.endswith(".safetensors"))


def _default_output_name(source: Checkpoint) -> str:
    # Sampler and full-state checkpoints of one step share a name; keep their exports apart.
    return source.name if source.kind == "sampler" else f"{source.name}-state"


def _result_visible(session: Session, job: ExportJob, now: datetime) -> bool:
    ckpt = session.get(Checkpoint, job.result_checkpoint_id) if job.result_checkpoint_id else None
    return ckpt is not None and checkpoints.is_visible(ckpt, now)


def _requeue(job: ExportJob, now: datetime) -> None:
    job.state, job.attempts, job.error, job.verification = ExportJobState.queued, 0, None, None
    job.lease_owner = job.lease_expires_at = job.heartbeat_at = job.not_before = None
    job.progress_bytes, job.finished_at, job.result_checkpoint_id, job.started_at = 0, None, None, None
    job.created_at = now


def submit(
    ctx: Context,
    principal: Principal,
    source: str,
    *,
    target: str,
    base_model: str | None = None,
    output_name: str | None = None,
    options: dict[str, Any] | None = None,
) -> ExportJob:
    """Queue an export of the checkpoint at tinker path ``source``; the same request twice returns
    the same job."""
    principal.require_write()
    _check_target(target)
    opts = _check_options(options)
    path = TinkerPath.parse(source)
    now = ctx.clock.now()
    for attempt in range(2):
        try:
            with session_scope(ctx.engine) as session:
                ckpt = checkpoints.get_for(session, principal, path, now=now)
                return _submit_one(
                    session,
                    ctx,
                    principal,
                    ckpt,
                    target=target,
                    base_model=base_model,
                    output_name=output_name,
                    options=opts,
                    batch_id=None,
                    now=now,
                )
        except DBIntegrityError:
            if attempt:  # two identical submissions raced: the other one's job is ours too
                raise
    raise AssertionError("unreachable")


def submit_batch(
    ctx: Context,
    principal: Principal,
    *,
    target: str,
    sources: list[str] | None = None,
    run_id: str | None = None,
    kind: str | None = None,
    name_pattern: str | None = None,
    base_model: str | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[str, list[ExportJob]]:
    """Fan out one job per source: an explicit list of tinker paths, or a filter (run, kind, name
    glob such as ``step-*``). Returns (batch id, jobs); already-known requests return their job."""
    principal.require_write()
    _check_target(target)
    opts = _check_options(options)
    if bool(sources) == (run_id is not None):
        raise InvalidRequest("give either a list of sources or a run filter, not both")
    if kind is not None and kind not in SOURCE_KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(SOURCE_KINDS)}")
    now = ctx.clock.now()
    batch_id = new_id("batch")
    with session_scope(ctx.engine) as session:
        if sources:
            if len(sources) > MAX_BATCH:
                raise InvalidRequest(f"at most {MAX_BATCH} sources per batch")
            ckpts = [checkpoints.get_for(session, principal, TinkerPath.parse(s), now=now) for s in sources]
        else:
            rows, _ = checkpoints.list_checkpoints(session, principal, now=now, run_id=run_id, kind=kind, limit=None)
            rx = _glob(name_pattern) if name_pattern else None
            ckpts = [c for c in rows if c.kind in SOURCE_KINDS and (rx is None or rx.match(c.name))]
            ckpts = _adapters_only(session, ckpts)
            if not ckpts:
                raise NotFound(
                    f"no sampler or full-state checkpoints match run {run_id}"
                    + (f", kind {kind}" if kind else "")
                    + (f", name {name_pattern}" if name_pattern else "")
                )
            if len(ckpts) > MAX_BATCH:
                raise InvalidRequest(f"{len(ckpts)} checkpoints match; at most {MAX_BATCH} per batch")
            ckpts.sort(key=lambda c: (c.created_at, c.id))
        jobs = [
            _submit_one(
                session,
                ctx,
                principal,
                c,
                target=target,
                base_model=base_model,
                output_name=None,
                options=opts,
                batch_id=batch_id,
                now=now,
            )
            for c in ckpts
        ]
    return batch_id, jobs


def _adapters_only(session: Session, ckpts: list[Checkpoint]) -> list[Checkpoint]:
    """Drop from a filter's matches the DCP checkpoints saved without an adapter config (full model
    or training state, not a LoRA adapter: ``integrations.dcp_lora``); named explicitly, they are refused."""
    layouts = checkpoints.layouts(session, ckpts)
    return [
        c for c in ckpts if layouts[c.id] != "dcp" or formats.ADAPTER_CONFIG in {f.path for f in checkpoints.files_of(session, c)}
    ]


def _glob(pattern: str) -> re.Pattern[str]:
    import fnmatch

    return re.compile(fnmatch.translate(pattern))


def submit_peft_export(
    ctx: Context, principal: Principal, source_checkpoint: str, output_name: str | None, ttl_seconds: int | None
) -> str:
    """Queue a PEFT export to ``tinker://{run}/external_weights/{output_name}`` (Tinker's
    ``save_weights_external``); returns the job id."""
    options = {"ttl_seconds": ttl_seconds} if ttl_seconds is not None else None
    return submit(ctx, principal, source_checkpoint, target="peft", output_name=output_name, options=options).id


# --- read / cancel ----------------------------------------------------------------------------


def get_job(session: Session, principal: Principal, job_id: str) -> ExportJob:
    job = session.get(ExportJob, job_id)
    if job is None or (job.tenant_id != principal.tenant_id and not principal.is_admin):
        raise NotFound(f"export job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    principal: Principal,
    *,
    state: str | None = None,
    batch_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[ExportJob], int]:
    q = select(ExportJob)
    if not principal.is_admin:
        q = q.where(ExportJob.tenant_id == principal.tenant_id)
    if state:
        q = q.where(ExportJob.state == state)
    if batch_id:
        q = q.where(ExportJob.batch_id == batch_id)
    total = session.exec(select(sa.func.count()).select_from(q.subquery())).one()
    rows = session.exec(q.order_by(col(ExportJob.created_at).desc(), col(ExportJob.id).desc()).offset(offset).limit(limit)).all()
    return list(rows), int(total)


def source_path(session: Session, job: ExportJob) -> str | None:
    src = session.get(Checkpoint, job.source_checkpoint_id)
    return checkpoints.tinker_path(src) if src else None


def result_path(session: Session, job: ExportJob) -> str | None:
    res = session.get(Checkpoint, job.result_checkpoint_id) if job.result_checkpoint_id else None
    return checkpoints.tinker_path(res) if res else None


def cancel(session: Session, principal: Principal, job_id: str, *, now: datetime) -> ExportJob:
    """Cancel a queued or running job. A running worker stops at its next heartbeat and never
    publishes (its publish is fenced on ``state = 'running'``)."""
    principal.require_write()
    job = get_job(session, principal, job_id)
    if job.state in ExportJobState.finished():
        if job.state == ExportJobState.cancelled:
            return job
        raise InvalidRequest(f"export job {job_id} already {job.state}")
    job.state, job.finished_at, job.lease_expires_at = ExportJobState.cancelled, now, None
    job.error = {"code": "cancelled", "message": "cancelled by request"}
    session.add(job)
    audit.record(session, at=now, action="export.cancel", tenant_id=principal.tenant_id, key_id=principal.key_id, target=job.id)
    return job


# --- claim / lease ----------------------------------------------------------------------------


def _claimable(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(
        sa.and_(
            col(ExportJob.state) == ExportJobState.queued,
            sa.or_(col(ExportJob.not_before).is_(None), col(ExportJob.not_before) <= now),
        ),
        sa.and_(col(ExportJob.state) == ExportJobState.running, col(ExportJob.lease_expires_at) < now),
    )


def claim(ctx: Context, owner: str, *, job_id: str | None = None) -> ExportJob | None:
    """Take the oldest claimable job (or ``job_id``) under a lease for ``owner``; None if none."""
    lease = ctx.settings.worker_lease_seconds
    for _ in range(5):  # lost races: try the next candidate
        now = ctx.clock.now()
        with session_scope(ctx.engine) as session:
            q = sa.select(col(ExportJob.id)).where(_claimable(now))
            if job_id:
                q = q.where(col(ExportJob.id) == job_id)
            candidate = session.execute(q.order_by(col(ExportJob.created_at), col(ExportJob.id)).limit(1)).scalar()
            if candidate is None:
                return None
            res = session.execute(
                sa.update(ExportJob)
                .where(col(ExportJob.id) == candidate, _claimable(now))
                .values(
                    state=ExportJobState.running,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease),
                    heartbeat_at=now,
                    attempts=ExportJob.attempts + 1,
                    not_before=None,
                    started_at=sa.func.coalesce(ExportJob.started_at, now),
                )
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result
                job = session.get(ExportJob, candidate, populate_existing=True)
                assert job is not None
                return job
    return None


def _owned(owner: str) -> sa.ColumnElement[bool]:
    return sa.and_(col(ExportJob.lease_owner) == owner, col(ExportJob.state) == ExportJobState.running)


def heartbeat(
    ctx: Context, job_id: str, owner: str, *, progress_bytes: int | None = None, total_bytes: int | None = None
) -> None:
    """Extend the lease; ``LeaseLost`` when the job was cancelled or taken over."""
    now = ctx.clock.now()
    values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=ctx.settings.worker_lease_seconds)}
    if progress_bytes is not None:
        values["progress_bytes"] = progress_bytes
    if total_bytes is not None:
        values["total_bytes"] = total_bytes
    with session_scope(ctx.engine) as session:
        res = session.execute(sa.update(ExportJob).where(col(ExportJob.id) == job_id, _owned(owner)).values(**values))
        if res.rowcount != 1:  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result
            raise LeaseLost(f"export job {job_id} is no longer ours (cancelled or taken over)")


def _finish(ctx: Context, job_id: str, owner: str, **values: Any) -> bool:
    with session_scope(ctx.engine) as session:
        res = session.execute(
            sa.update(ExportJob).where(col(ExportJob.id) == job_id, _owned(owner)).values(lease_expires_at=None, **values)
        )
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result


# --- run --------------------------------------------------------------------------------------


class _Progress:
    """Counts bytes moved and pushes them (with the heartbeat) to the job row now and then."""

    def __init__(self, ctx: Context, job: ExportJob, owner: str) -> None:
        self.ctx, self.job_id, self.owner = ctx, job.id, owner
        self.done, self.total = 0, job.total_bytes
        self.lock = threading.Lock()
        self.last_push = 0
        self.lost: LeaseLost | None = None

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            due = self.done - self.last_push >= PROGRESS_EVERY_BYTES
        if due:
            self.push()
        if self.lost is not None:
            raise self.lost

    def push(self) -> None:
        with self.lock:
            self.last_push = self.done
            done, total = self.done, max(self.total, self.done)
        try:
            heartbeat(self.ctx, self.job_id, self.owner, progress_bytes=done, total_bytes=total)
        except LeaseLost as exc:
            self.lost = exc


class _Heartbeat:
    """A thread that keeps the lease alive while a long step (conversion) runs."""

    def __init__(self, progress: _Progress, interval: float) -> None:
        self.progress, self.interval = progress, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="export-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.progress.push()
            except Exception:  # noqa: BLE001 - a failed heartbeat is retried; the lease decides
                log.warning("heartbeat failed", exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON (and PostgreSQL's json) has no NaN/Infinity
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def convert(
    target: str, adapter_dir: Path, base_dir: Path, out_dir: Path, *, base_name: str | None = None, shard_bytes: int | None = None
) -> dict[str, Any]:
    """Run the local conversion library (``weightstore.export``); returns the result summary with its
    verification report as JSON-able data. Raises the library's errors (``VerificationFailed``, ...)."""
    from weightstore import export as lib

    _check_target(target)
    if target == "peft":
        result = lib.export_peft(adapter_dir, base_dir, out_dir, base_model_name=base_name)
    elif shard_bytes is not None:
        result = lib.export_merged(adapter_dir, base_dir, out_dir, shard_size=shard_bytes)
    else:
        result = lib.export_merged(adapter_dir, base_dir, out_dir)
    data = _jsonable(result.to_dict())
    # The plan can be long (one line per tensor); the job keeps the summary and the checks.
    return {k: v for k, v in data.items() if k not in ("plan", "out_dir")}


def _download_checkpoint(ctx: Context, ckpt_files: list[tuple[str, int, str]], dest: Path, progress: _Progress) -> None:
    for path, size, sha in ckpt_files:
        blobs.fetch_to_file(ctx, sha, size, dest / path, progress=progress.add, what=f"source file {path}")


def _adapter_from_dcp(
    ctx: Context, src_files: list[tuple[str, int, str]], work: Path, adapter_dir: Path, progress: _Progress
) -> None:
    """A DCP checkpoint of a LoRA adapter as a Tinker adapter directory (``integrations.dcp_lora``):
    only the files holding the adapter are downloaded; the rest count as done."""
    from weightstore.integrations.dcp_lora import adapter_from_dcp

    fetched: set[str] = set()

    def fetch(names: Sequence[str], dest: Path) -> None:
        _download_checkpoint(ctx, [f for f in src_files if f[0] in set(names)], dest, progress)
        fetched.update(names)

    adapter_from_dcp(fetch, [p for p, _, _ in src_files], work, adapter_dir)
    progress.add(sum(size for p, size, _ in src_files if p not in fetched))


def _publish_output(
    ctx: Context,
    principal: Principal,
    job: ExportJob,
    source: Checkpoint,
    out_dir: Path,
    owner: str,
    progress: _Progress,
    verification: dict[str, Any],
) -> Checkpoint:
    """Publish the converted files as the job's output checkpoint, fenced by the job's lease."""
    files = publish.local_files(out_dir)
    with progress.lock:
        progress.total += sum(f.size_bytes for f in files)
    new = publish.NewCheckpoint(
        run_id=source.run_id,
        kind=TARGETS[job.target],
        name=job.output_name or source.name,
        ttl_seconds=(job.options or {}).get("ttl_seconds"),
        user_metadata={
            "exported_from": checkpoints.tinker_path(source),
            "export_job": job.id,
            "base_model": job.base_model or "",
        },
        exported_from_id=source.id,
    )

    def still_ours(session: Session, ckpt: Checkpoint) -> None:
        # Fencing: the output exists only if this worker still owns the running job.
        res = session.execute(
            sa.update(ExportJob)
            .where(col(ExportJob.id) == job.id, _owned(owner))
            .values(
                state=ExportJobState.succeeded,
                result_checkpoint_id=ckpt.id,
                finished_at=ctx.clock.now(),
                lease_expires_at=None,
                verification=verification,
                error=None,
                progress_bytes=progress.done,
                total_bytes=max(progress.total, progress.done),
            )
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]  # DML yields a CursorResult; sqlmodel types it Result
            raise LeaseLost(f"export job {job.id} was cancelled or taken over; output discarded")

    return publish.publish_files(
        ctx, principal, new, files, fence=still_ours, progress=progress.add, audit_details={"export_job": job.id}
    )


def run_job(
    ctx: Context,
    job: ExportJob,
    owner: str,
    *,
    work_root: Path | None = None,
    converter: Callable[..., dict[str, Any]] | None = None,
) -> str:
    """Run a claimed job to its end. Returns the final state as this worker left it
    (``succeeded``, ``failed``, ``queued`` for a retry, or ``lost``)."""
    convert_fn = converter or convert
    principal = Principal(tenant_id=job.tenant_id, key_id=f"export-worker:{owner}"[:64], role=Role.trainer)
    progress = _Progress(ctx, job, owner)
    work_root = Path(work_root or Path(ctx.settings.data_dir) / "work")
    work_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work_root, prefix=f"{job.id}-"))
    verification: dict[str, Any] | None = None
    try:
        now = ctx.clock.now()
        with session_scope(ctx.engine) as session:
            source = session.get(Checkpoint, job.source_checkpoint_id)
            if source is None or not checkpoints.is_visible(source, now):
                raise NotFound(f"the source checkpoint of export job {job.id} no longer exists")
            src_files = [(f.path, f.size_bytes, f.sha256) for f in checkpoints.files_of(session, source)]
            base = basemodels.get(session, job.base_model or "")
            progress.total = source.size_bytes + base.size_bytes
        progress.push()
        adapter_dir, out_dir = tmp / "adapter", tmp / "out"
        with _Heartbeat(progress, max(1.0, ctx.settings.worker_lease_seconds / 4)):
            if formats.checkpoint_layout(source.kind, [p for p, _, _ in src_files]) == "dcp":
                _adapter_from_dcp(ctx, src_files, tmp / "dcp", adapter_dir, progress)
            else:
                _download_checkpoint(ctx, src_files, adapter_dir, progress)
            base_dir = basemodels.materialise(ctx, base.name, progress=progress.add)
            if progress.lost:
                raise progress.lost
            shard = (job.options or {}).get("shard_bytes") or ctx.settings.export_shard_bytes
            verification = convert_fn(job.target, adapter_dir, base_dir, out_dir, base_name=base.name, shard_bytes=shard)
            if progress.lost:
                raise progress.lost
            _publish_output(ctx, principal, job, source, out_dir, owner, progress, verification)
        log.info("export job %s succeeded", job.id)
        return ExportJobState.succeeded
    except LeaseLost:
        log.info("export job %s: lease lost (cancelled or taken over); stopping", job.id)
        return LOST
    except TransientError as exc:
        if job.attempts >= MAX_ATTEMPTS:
            _finish(
                ctx,
                job.id,
                owner,
                state=ExportJobState.failed,
                finished_at=ctx.clock.now(),
                error={
                    **exc.to_dict(),
                    "attempts": job.attempts,
                    "message": f"{exc.message} (gave up after {job.attempts} attempts)",
                },
            )
            return ExportJobState.failed
        delay = backoff_seconds(job.attempts)
        log.warning("export job %s: transient error (%s); retrying in %.0f s", job.id, exc.message, delay)
        _finish(
            ctx,
            job.id,
            owner,
            state=ExportJobState.queued,
            lease_owner=None,
            progress_bytes=0,
            not_before=ctx.clock.now() + timedelta(seconds=delay),
            error={**exc.to_dict(), "retry_in_seconds": delay},
        )
        return ExportJobState.queued
    except Exception as exc:  # noqa: BLE001 - any other failure is permanent and reported on the job
        err = (
            exc.to_dict()
            if isinstance(exc, WeightstoreError)
            else {"code": ExportFailed.code, "message": f"{type(exc).__name__}: {exc}"}
        )
        details = getattr(exc, "details", None) or {}
        ver = verification if verification is not None else _jsonable(details.get("verification"))
        log.warning("export job %s failed: %s", job.id, err.get("message"))
        _finish(
            ctx, job.id, owner, state=ExportJobState.failed, finished_at=ctx.clock.now(), error=_jsonable(err), verification=ver
        )
        return ExportJobState.failed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_one(ctx: Context, owner: str | None = None, **kw: Any) -> str | None:
    """Claim and run one job; None when there was nothing to do."""
    owner = owner or default_owner()
    job = claim(ctx, owner)
    if job is None:
        return None
    return run_job(ctx, job, owner, **kw)


__all__ = [
    "TARGETS",
    "cancel",
    "claim",
    "convert",
    "get_job",
    "heartbeat",
    "list_jobs",
    "result_path",
    "run_job",
    "run_one",
    "source_path",
    "submit",
    "submit_batch",
    "submit_peft_export",
]
