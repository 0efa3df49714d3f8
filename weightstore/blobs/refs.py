"""What counts as a reference to a blob: the one definition that the collector's mark, sweep and
verify share, and that ``blobs.tombstone`` re-checks (rule S6/S7: a referenced blob is never deleted).

A blob is referenced (must not be deleted) while any of these points at its sha256:
1. a file of an upload still ``open`` (even past its expiry, until the orphans phase closes it);
2. a manifest file of a checkpoint ``committed`` or ``expired`` (expired stays restorable until
   the expire phase releases it to ``deleted`` after the grace period);
3. a file of a registered base model;
4. a manifest file of the source checkpoint of an export job not yet finished.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from weightstore.models import (
    BaseModelFile,
    Checkpoint,
    CheckpointFile,
    CheckpointState,
    ExportJob,
    ExportJobState,
    Upload,
    UploadFile,
    UploadState,
)

REFERENCING_CHECKPOINT_STATES = (CheckpointState.committed.value, CheckpointState.expired.value)
EXPORT_FINISHED_STATES = tuple(s.value for s in ExportJobState.finished())
"""Any other export state (queued, running, whatever a future version adds) protects its source:
unknown states fail safe."""
REFERENCING_TABLES = ("checkpoint_file", "upload_file", "base_model_file")
"""The tables whose rows create references; the tombstone locks them (PostgreSQL) before its re-check."""


def upload_refs() -> sa.Select[Any]:
    return (
        sa.select(UploadFile.sha256.label("sha256"))  # type: ignore[attr-defined]
        .join(Upload, Upload.id == UploadFile.upload_id)  # type: ignore[arg-type]
        .where(Upload.state == UploadState.open.value)  # type: ignore[arg-type]
    )


def checkpoint_refs() -> sa.Select[Any]:
    return (
        sa.select(CheckpointFile.sha256.label("sha256"))  # type: ignore[attr-defined]
        .join(Checkpoint, Checkpoint.id == CheckpointFile.checkpoint_id)  # type: ignore[arg-type]
        .where(Checkpoint.state.in_(REFERENCING_CHECKPOINT_STATES))  # type: ignore[attr-defined]
    )


def base_model_refs() -> sa.Select[Any]:
    return sa.select(BaseModelFile.sha256.label("sha256"))  # type: ignore[attr-defined]


def export_refs() -> sa.Select[Any]:
    return (
        sa.select(CheckpointFile.sha256.label("sha256"))  # type: ignore[attr-defined]
        .join(ExportJob, ExportJob.source_checkpoint_id == CheckpointFile.checkpoint_id)  # type: ignore[arg-type]
        .where(ExportJob.state.notin_(EXPORT_FINISHED_STATES))  # type: ignore[attr-defined]
    )


def committed_refs() -> Any:
    """References whose bytes MUST exist (uploads in flight may not have sent theirs yet)."""
    return sa.union(checkpoint_refs(), base_model_refs(), export_refs())


def all_refs() -> Any:
    """The live set, uploads first (they are the references most likely to appear meanwhile)."""
    return sa.union(upload_refs(), checkpoint_refs(), export_refs(), base_model_refs())


def is_referenced(sha_col: Any) -> Any:
    """A correlated EXISTS for one blob: used inside the tombstone transaction."""
    return sa.or_(
        *(
            sa.exists(q.where(col == sha_col))
            for q, col in (
                (upload_refs(), UploadFile.sha256),
                (checkpoint_refs(), CheckpointFile.sha256),
                (export_refs(), CheckpointFile.sha256),
                (base_model_refs(), BaseModelFile.sha256),
            )
        )
    )


__all__ = [
    "EXPORT_FINISHED_STATES",
    "REFERENCING_CHECKPOINT_STATES",
    "REFERENCING_TABLES",
    "all_refs",
    "base_model_refs",
    "checkpoint_refs",
    "committed_refs",
    "export_refs",
    "is_referenced",
    "upload_refs",
]
