"""The trash bin (issue 12, part 4): what the caller's tenant can still restore, and restore by tinker path.

Both routes are tenant-scoped for every role (an admin key sees its own tenant's trash here; it
restores another tenant's checkpoint by id through ``POST /v1/admin/checkpoints/{id}/restore`` and
reads any tenant's trash on the admin UI's tenant page). Listing needs any key; restore a trainer or
admin key. Another tenant's path answers ``not_found``, the same body as a missing one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from weightstore import retention
from weightstore.names import TinkerPath

from ..convert import checkpoint_public
from ..deps import CtxDep, CurrentPrincipal, SessionDep, WriterPrincipal
from ..errors import request_id_of
from ..schemas import CheckpointPublic, TrashEntryPublic, TrashPublic, TrashRestoreCreate

router = APIRouter(prefix="/v1/trash", tags=["trash"])


@router.get("", operation_id="list_trash", response_model=TrashPublic)
def list_trash(principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> TrashPublic:
    """Expired checkpoints not yet collected, most recently expired first, with the time until which
    a restore is guaranteed (``restorable_until``) and when the collector will have taken them
    (``collected_by``)."""
    entries = retention.trash(session, principal, now=ctx.clock.now(), settings=ctx.settings)
    return TrashPublic(
        checkpoints=[
            TrashEntryPublic(
                tinker_path=e.tinker_path,
                checkpoint_id=e.checkpoint_id,
                kind=e.kind,
                size_bytes=e.size_bytes,
                expired_at=e.expired_at,
                restorable_until=e.restorable_until,
                collected_by=e.collected_by,
            )
            for e in entries
        ]
    )


@router.post("/restore", operation_id="restore_from_trash", response_model=CheckpointPublic)
def restore(
    body: TrashRestoreCreate, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep, request: Request
) -> CheckpointPublic:
    """Bring an expired checkpoint back (visible again, billed without a gap) with a new TTL."""
    ckpt = retention.restore_by_path(
        session,
        principal,
        TinkerPath.parse(body.path),
        settings=ctx.settings,
        now=ctx.clock.now(),
        ttl_seconds=body.ttl_seconds,
        request_id=request_id_of(request),
    )
    return checkpoint_public(ckpt)
