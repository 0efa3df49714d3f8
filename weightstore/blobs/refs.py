"""What counts as a reference to a blob (a referenced blob is never deleted: rules S6, S7).

The one definition that the collector's mark, sweep and verify share, and that ``blobs.tombstone``
re-checks.

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
from sqlmodel import col

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
        sa.select(col(UploadFile.sha256).label("sha256"))
        .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
        .where(col(Upload.state) == UploadState.open.value)
    )


def checkpoint_refs() -> sa.Select[Any]:
    return (
        sa.select(col(CheckpointFile.sha256).label("sha256"))
        .join(Checkpoint, col(Checkpoint.id) == col(CheckpointFile.checkpoint_id))
        .where(col(Checkpoint.state).in_(REFERENCING_CHECKPOINT_STATES))
    )


def base_model_refs() -> sa.Select[Any]:
    return sa.select(col(BaseModelFile.sha256).label("sha256"))


def export_refs() -> sa.Select[Any]:
    return (
        sa.select(col(CheckpointFile.sha256).label("sha256"))
        .join(ExportJob, col(ExportJob.source_checkpoint_id) == col(CheckpointFile.checkpoint_id))
        .where(col(ExportJob.state).notin_(EXPORT_FINISHED_STATES))
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
