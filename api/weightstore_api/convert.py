"""Rows → public schemas (one place, shared by the native and Tinker routers)."""

from __future__ import annotations

from sqlalchemy.orm import object_session
from sqlmodel import Session

from weightstore import checkpoints, hub, policies
from weightstore.models import ApiKey, Checkpoint, TrainingRun
from weightstore.names import TinkerPath

from .schemas import CheckpointFilePublic, CheckpointPublic, HubCoordinatesPublic, KeyPublic, RetentionPolicyPublic, RunPublic


def run_public(run: TrainingRun) -> RunPublic:
    return RunPublic(
        run_id=run.id,
        tenant_id=run.tenant_id,
        base_model=run.base_model,
        lora_rank=run.lora_rank,
        train_mlp=run.train_mlp,
        train_attn=run.train_attn,
        train_unembed=run.train_unembed,
        trainable=run.trainable,
        user_metadata=run.user_metadata,
        created_at=run.created_at,
        last_request_time=run.last_request_time,
    )


def retention_public(policy: policies.EffectivePolicy | None) -> RetentionPolicyPublic | None:
    if policy is None:
        return None
    return RetentionPolicyPublic(
        scope="run" if policy.scope == "run" else "tenant",
        tenant_id=policy.tenant_id,
        run_id=policy.run_id,
        keep_last=policy.keep_last,
        keep_every=policy.keep_every,
        rule=policy.rule,
        updated_at=policy.updated_at,
    )


def checkpoint_public(
    ckpt: Checkpoint,
    session: Session | None = None,
    *,
    policy: policies.EffectivePolicy | None = None,
    layout: str | None = None,
) -> CheckpointPublic:
    """``session`` given: with its files and the retention policy in effect (else ``policy``).
    ``layout`` (``checkpoints.layouts``, one query for a list) is looked up in ``session`` or the
    session the row is still attached to when not given."""
    path = TinkerPath(ckpt.run_id, ckpt.kind, ckpt.name)
    files = None
    if layout is None and (attached := session or object_session(ckpt)) is not None:
        layout = checkpoints.layouts(attached, [ckpt])[ckpt.id]
    if session is not None:
        policy = policies.effective_for_runs(session, [ckpt.run_id]).get(ckpt.run_id)
        files = [
            CheckpointFilePublic(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256)
            for f in checkpoints.files_of(session, ckpt)
        ]
    return CheckpointPublic(
        tinker_path=str(path),
        run_id=ckpt.run_id,
        kind=ckpt.kind,
        name=ckpt.name,
        checkpoint_id=path.checkpoint_id,
        size_bytes=ckpt.size_bytes,
        created_at=ckpt.created_at,
        expires_at=ckpt.expires_at,
        public=ckpt.public,
        user_metadata=ckpt.user_metadata,
        layout=layout,
        files=files,
        pinned=ckpt.pinned,
        retention=retention_public(policy),
        hub=HubCoordinatesPublic(**vars(hub.coordinates(ckpt))),
    )


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic(
        key_id=row.id,
        tenant_id=row.tenant_id,
        role=row.role,
        prefix=row.prefix,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )
