"""Checkpoints as the Tinker surface sees them. Catalog functions (``session`` first, no commit).

- **Views**: only Tinker's three kinds (``TINKER_KINDS``); another tenant's checkpoints only when
  published (``published_run_ids`` is the set of runs that makes "accessible").
- **Publish / unpublish**: owner only (anyone else gets ``NotFound``); ``Conflict`` when the
  checkpoint is already in that state (Tinker's contract answers 409 there).
- **copy_weights**: zero-copy. A new run that cannot be trained on, new checkpoint rows whose
  manifest points at the *same* blobs (``share_checkpoint``), a ``tenant_blob`` proof for the
  destination tenant, a ledger ``commit`` for the copy, its own TTL. The copy is new logical bytes
  for the destination tenant: held to its hard quota like a declare (``tenants.check_quota`` under
  the tenant row lock, after the run's lock: issue 12, part 2). De-duplicated on
  ``X-Idempotency-Key`` through ``idempotency_record`` (the SDK reuses one key across all of its
  retry layers).
- **weights_info**: base model and LoRA shape of a checkpoint, from its run and its
  ``adapter_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from weightstore import audit, blobs, checkpoints, publish, retention, runs, tenants
from weightstore.auth import Principal
from weightstore.billing import ledger
from weightstore.errors import Conflict, InvalidRequest, NotFound
from weightstore.formats import ADAPTER_CONFIG
from weightstore.models import Checkpoint, CheckpointFile, IdempotencyRecord, TrainingRun
from weightstore.names import TinkerPath, check_run_id, new_id
from weightstore.objectstore import ObjectStore, blob_key
from weightstore.settings import Settings

TINKER_KINDS = ("training", "sampler", "external")
"""The kinds Tinker's ``CheckpointType`` knows; native kinds (``merged``) are left out of Tinker
lists because the SDK validates responses strictly and would reject an unknown literal."""

ATTN_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "in_proj_q", "in_proj_k", "in_proj_v"}
MLP_MODULES = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate_up_proj", "experts", "fc1", "fc2"}
UNEMBED_MODULES = {"lm_head", "unembed_tokens", "embed_tokens"}

COPY_OPERATION = "copy_weights"
COPY_KEY_PREFIX = "copy:"
"""``idempotency_record`` keys of ``copy_weights`` (namespaced: other operations may share the table)."""


# --- views ------------------------------------------------------------------------------------


def published_run_ids(now: datetime) -> SelectOfScalar[str]:
    """Runs with at least one visible, published Tinker-kind checkpoint (a subquery)."""
    return (
        select(Checkpoint.run_id)
        .where(
            col(Checkpoint.public).is_(True),
            checkpoints.visible_clause(now),
            col(Checkpoint.kind).in_(TINKER_KINDS),
        )
        .distinct()
    )


def _run_checkpoints_query(principal: Principal, run: TrainingRun, now: datetime) -> SelectOfScalar[Checkpoint]:
    q = select(Checkpoint).where(
        Checkpoint.run_id == run.id,
        checkpoints.visible_clause(now),
        col(Checkpoint.kind).in_(TINKER_KINDS),
    )
    if run.tenant_id != principal.tenant_id:
        q = q.where(col(Checkpoint.public).is_(True))
    return q.order_by(col(Checkpoint.created_at).desc(), col(Checkpoint.id).desc())


def run_checkpoints(session: Session, principal: Principal, run: TrainingRun, *, now: datetime) -> list[Checkpoint]:
    """All visible Tinker-kind checkpoints of a run the caller may see, newest first."""
    return list(session.exec(_run_checkpoints_query(principal, run, now)).all())


def last_checkpoint(session: Session, principal: Principal, run: TrainingRun, kind: str, *, now: datetime) -> Checkpoint | None:
    """The newest checkpoint of ``kind`` in the run that the caller may see."""
    return session.exec(_run_checkpoints_query(principal, run, now).where(Checkpoint.kind == kind).limit(1)).first()


def user_checkpoints(
    session: Session, principal: Principal, *, now: datetime, limit: int, offset: int
) -> tuple[list[Checkpoint], int]:
    """All of the caller's visible Tinker-kind checkpoints, newest first. Returns (page, total)."""
    q = select(Checkpoint).where(
        Checkpoint.tenant_id == principal.tenant_id,
        checkpoints.visible_clause(now),
        col(Checkpoint.kind).in_(TINKER_KINDS),
    )
    total = session.exec(select(sa.func.count()).select_from(q.subquery())).one()
    rows = session.exec(
        q.order_by(col(Checkpoint.created_at).desc(), col(Checkpoint.id).desc()).offset(offset).limit(limit)
    ).all()
    return list(rows), int(total)


# --- publish ----------------------------------------------------------------------------------


def set_public(
    session: Session, principal: Principal, path: TinkerPath, public: bool, *, now: datetime, request_id: str | None = None
) -> Checkpoint:
    """Owner only: another tenant's checkpoint is "not found", published or not. ``Conflict`` when
    it already is in that state."""
    principal.require_write()
    ckpt = checkpoints.get_for(session, principal, path, now=now)
    if ckpt.public == public:
        raise Conflict(f"checkpoint {path} is already {'public' if public else 'private'}")
    ckpt.public = public
    session.add(ckpt)
    audit.record(
        session,
        at=now,
        action="checkpoint.publish" if public else "checkpoint.unpublish",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=str(path),
        request_id=request_id,
    )
    return ckpt


# --- weights info -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    base_model: str
    is_lora: bool
    lora_rank: int | None
    train_unembed: bool | None
    train_mlp: bool | None
    train_attn: bool | None


def _adapter_config(session: Session, ckpt: Checkpoint, store: ObjectStore, max_bytes: int) -> dict[str, Any] | None:
    row = session.get(CheckpointFile, (ckpt.id, ADAPTER_CONFIG))
    if row is None or row.size_bytes > max_bytes:
        return None
    try:
        value = json.loads(store.read_bytes(blob_key(row.sha256)))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def weights_info(
    session: Session, principal: Principal, path: TinkerPath, *, store: ObjectStore, settings: Settings, now: datetime
) -> WeightsInfo:
    """Readable for the owner and, for published checkpoints, for everyone. Reads the (small,
    bounded by ``max_json_file_bytes``) adapter config from the store inside the caller's read."""
    ckpt = checkpoints.get_for(session, principal, path, now=now, allow_public=True)
    run = session.get(TrainingRun, ckpt.run_id)
    assert run is not None
    config = _adapter_config(session, ckpt, store, settings.max_json_file_bytes) or {}
    rank = config.get("r") if isinstance(config.get("r"), int) else run.lora_rank
    mlp, attn, unembed = run.train_mlp, run.train_attn, run.train_unembed
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        leaves = {str(t).rsplit(".", 1)[-1] for t in targets}
        mlp, attn, unembed = bool(leaves & MLP_MODULES), bool(leaves & ATTN_MODULES), bool(leaves & UNEMBED_MODULES)
    return WeightsInfo(
        base_model=run.base_model, is_lora=True, lora_rank=rank, train_unembed=unembed, train_mlp=mlp, train_attn=attn
    )


# --- copy_weights -----------------------------------------------------------------------------


def share_checkpoint(
    session: Session,
    principal: Principal,
    source: Checkpoint,
    run: TrainingRun,
    *,
    name: str,
    ttl_seconds: int | None,
    now: datetime,
    request_id: str | None,
    kind: str | None = None,
) -> Checkpoint:
    """New checkpoint rows in ``run`` pointing at the source's blobs: no byte moves. ``NotFound``
    when any of them is no longer live (the collector is reclaiming the source); ``RunDeleted`` when
    ``run`` was deleted; ``TenantQuotaExceeded`` when the copy does not fit the caller's quota."""
    runs.lock_for_write(session, principal.tenant_id, run.id)  # lock order: run, blobs, tenant
    files = checkpoints.files_of(session, source)
    live, not_live = blobs.lock_live(session, [f.sha256 for f in files])
    if not_live:
        raise NotFound(f"checkpoint {checkpoints.tinker_path(source)} is being collected")
    tenants.check_quota(session, principal.tenant_id, source.size_bytes, now=now, lock=True)
    ckpt = Checkpoint(
        id=new_id("ckpt"),
        tenant_id=principal.tenant_id,
        run_id=run.id,
        kind=kind or source.kind,
        name=name,
        size_bytes=source.size_bytes,
        created_at=now,
        expires_at=retention.expires_at_for(now, ttl_seconds),
        user_metadata=source.user_metadata,
        copied_from_id=source.id,
    )
    session.add(ckpt)
    session.flush()
    publish.add_manifest(session, ckpt, [(f.path, f.size_bytes, f.sha256) for f in files], live, now=now)
    ledger.on_commit(session, ckpt, now=now)
    audit.record(
        session,
        at=now,
        action="checkpoint.copy",
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        target=checkpoints.tinker_path(ckpt),
        request_id=request_id,
        source=checkpoints.tinker_path(source),
        size_bytes=ckpt.size_bytes,
    )
    return ckpt


def _copied_path(session: Session, tenant_id: str, key: str) -> str | None:
    """The path an earlier copy with this idempotency key answered, if any."""
    done = session.get(IdempotencyRecord, (tenant_id, key))
    if done is None or done.operation != COPY_OPERATION or not done.response:
        return None
    return str(done.response["tinker_path"])


def _copy(
    session: Session,
    principal: Principal,
    source_path: TinkerPath,
    *,
    ttl_seconds: int | None,
    run_id: str | None,
    idempotency_key: str | None,
    request_id: str | None,
    now: datetime,
) -> str:
    source = checkpoints.get_for(session, principal, source_path, now=now, allow_public=True)
    src_run = session.get(TrainingRun, source.run_id)
    assert src_run is not None
    run = runs.create_run(
        session,
        principal,
        base_model=src_run.base_model,
        now=now,
        run_id=run_id,
        lora_rank=src_run.lora_rank,
        train_mlp=src_run.train_mlp,
        train_attn=src_run.train_attn,
        train_unembed=src_run.train_unembed,
        user_metadata=src_run.user_metadata if src_run.tenant_id == principal.tenant_id else None,
        trainable=False,
        copied_from_run_id=src_run.id,
    )
    ckpt = share_checkpoint(
        session, principal, source, run, name=source.name, ttl_seconds=ttl_seconds, now=now, request_id=request_id
    )
    path = checkpoints.tinker_path(ckpt)
    if idempotency_key:
        session.add(
            IdempotencyRecord(
                tenant_id=principal.tenant_id,
                key=idempotency_key,
                operation=COPY_OPERATION,
                created_at=now,
                response={"tinker_path": path},
            )
        )
    session.flush()
    return path


def copy_weights(
    session: Session,
    principal: Principal,
    source_path: str,
    *,
    settings: Settings,
    now: datetime,
    ttl_seconds: int | None = None,
    run_id: str | None = None,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> str:
    """Copy a checkpoint (own or published) into a new, non-trainable run. Returns the new path.

    The same ``idempotency_key`` always answers the first copy's path: a retry whose first attempt
    did commit (the answer was lost) does not make a second copy. The copy runs in a savepoint, so
    when two attempts with one key race, the loser's insert fails and it answers the winner's path.
    """
    principal.require_write()
    retention.check_ttl(settings, ttl_seconds)
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
        raise InvalidRequest("X-Idempotency-Key must be 1..200 characters")
    path = TinkerPath.parse(source_path)
    if run_id is not None:
        check_run_id(run_id)
    key = None if idempotency_key is None else COPY_KEY_PREFIX + idempotency_key
    if key is not None and (done := _copied_path(session, principal.tenant_id, key)) is not None:
        return done
    try:
        with session.begin_nested():
            return _copy(
                session,
                principal,
                path,
                ttl_seconds=ttl_seconds,
                run_id=run_id,
                idempotency_key=key,
                request_id=request_id,
                now=now,
            )
    except DBIntegrityError:
        if key is None or (done := _copied_path(session, principal.tenant_id, key)) is None:
            raise
        return done
