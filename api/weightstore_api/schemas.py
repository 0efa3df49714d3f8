"""Request and response bodies of the native API (``XCreate`` / ``XPublic`` / ``XsPublic``).

Every native router (``/v1``: runs, uploads, checkpoints, keys, exports, base models, collector,
billing) takes its bodies from here; the Tinker surface has its own in ``routers/tinker_schemas.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from weightstore.billing.units import HOURS_PER_MONTH
from weightstore.formats import USER_METADATA_MAX_BYTES, USER_METADATA_MAX_ENTRIES, USER_METADATA_MAX_KEY_CHARS

UserMetadata = Annotated[
    dict[str, str],
    Field(
        max_length=USER_METADATA_MAX_ENTRIES,
        description=f"labels: at most {USER_METADATA_MAX_ENTRIES} entries, keys up to {USER_METADATA_MAX_KEY_CHARS} "
        f"characters, {USER_METADATA_MAX_BYTES} bytes in all (weightstore.formats.check_user_metadata)",
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RunCreate(Strict):
    base_model: str = Field(min_length=1, max_length=200)
    run_id: str | None = Field(default=None, max_length=200)
    lora_rank: int | None = Field(default=None, ge=1, le=4096)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    user_metadata: UserMetadata | None = None


class RunPublic(BaseModel):
    run_id: str
    tenant_id: str
    base_model: str
    lora_rank: int | None
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    trainable: bool
    user_metadata: dict[str, str] | None
    created_at: datetime
    last_request_time: datetime


class RunsPublic(BaseModel):
    runs: list[RunPublic]
    total_count: int


class FileDeclaration(Strict):
    path: str = Field(min_length=1, max_length=255)
    size_bytes: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)


class UploadCreate(Strict):
    run_id: str = Field(min_length=1, max_length=200)
    kind: str = Field(description="training (full state) or sampler (weights only)")
    name: str = Field(min_length=1, max_length=255)
    files: list[FileDeclaration] = Field(default=[], description="at least one, unless layout is dcp")
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: UserMetadata | None = None
    transfer: str = Field(default="stream", description="stream (through the service) or presigned (direct to S3)")
    layout: str | None = Field(
        default=None, description="dcp: a PyTorch Distributed Checkpoint whose ranks add their files (POST .../files)"
    )


class FileAnswerPublic(BaseModel):
    path: str
    size_bytes: int
    sha256: str
    transfer: str = Field(description="present (dedup: send nothing), stream or presigned")
    url: str | None = None
    headers: dict[str, str] = {}
    part_size: int | None = None
    part_urls: list[str] = Field(default=[], description="presigned URLs of parts first_part.. (one page)")
    part_count: int | None = Field(default=None, description="parts in the file; GET .../transfer pages out the rest")
    first_part: int = 1


class UploadPublic(BaseModel):
    upload_id: str
    expires_at: datetime
    tinker_path: str
    bytes_to_send: int
    files: list[FileAnswerPublic]
    lease_seconds: int = 0
    """The upload closes this long after its last renewal (``POST /v1/uploads/{id}/renew``)."""


class UploadLeasePublic(BaseModel):
    """A renewed upload lease (issue 13, found 4)."""

    upload_id: str
    expires_at: datetime
    lease_seconds: int


class FileReceipt(BaseModel):
    path: str
    size_bytes: int
    sha256: str


class CheckpointFilePublic(BaseModel):
    path: str
    size_bytes: int
    sha256: str


class HubCoordinatesPublic(BaseModel):
    """Where a checkpoint is on the Hugging Face surface (``HF_ENDPOINT=<weightstore>``; ``weightstore.hub``)."""

    repo_id: str
    revision: str = Field(description="the checkpoint's own revision: its files at the root")
    subfolder: str = Field(description="the same files inside the run's `main` revision (vLLM's resolver layout)")


class CheckpointPublic(BaseModel):
    tinker_path: str
    run_id: str
    kind: str
    name: str
    checkpoint_id: str
    size_bytes: int
    created_at: datetime
    expires_at: datetime | None
    public: bool
    user_metadata: dict[str, str] | None
    layout: str | None = Field(
        None,
        description="how its files are laid out, recognised from their names (weightstore.formats.checkpoint_layout): "
        "tinker, dcp (PyTorch Distributed Checkpoint), peft, hf or files",
    )
    files: list[CheckpointFilePublic] | None = None
    pinned: bool = Field(False, description="never expired by a retention policy or a TTL")
    retention: RetentionPolicyPublic | None = Field(None, description="the retention policy in effect for its run (none: null)")
    hub: HubCoordinatesPublic | None = Field(None, description="Hugging Face repo id, revision and subfolder")


class CheckpointsPublic(BaseModel):
    checkpoints: list[CheckpointPublic]
    total_count: int


class CommitPublic(BaseModel):
    tinker_path: str
    checkpoint: CheckpointPublic
    bytes_received: int


class TTLUpdate(Strict):
    ttl_seconds: int | None


class FileUrlPublic(BaseModel):
    path: str
    size_bytes: int
    sha256: str
    url: str
    expires_at: datetime
    chunk_size: int | None = None
    """Bytes per chunk of ``chunk_sha256`` (issue 14); null: none recorded yet, verify the whole file."""
    chunk_sha256: list[str] | None = None
    """sha256 of each ``chunk_size`` slice of the file, in order: verify ranges in parallel."""


class FileUrlsPublic(BaseModel):
    tinker_path: str
    files: list[FileUrlPublic]


class KeyCreate(Strict):
    tenant: str = Field(min_length=1, max_length=64)
    role: str = Field(description="trainer, reader or admin")
    name: str | None = Field(default=None, max_length=128)
    create_tenant: bool = Field(default=False, description="create the tenant if it does not exist (else: 404 not_found)")


class KeyPublic(BaseModel):
    key_id: str
    tenant_id: str
    role: str
    prefix: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    api_key: str = Field(description="shown once; only its hash is stored")


class KeyRotate(Strict):
    grace_seconds: int = Field(default=0, ge=0, description="the old key keeps working this long (0: revoked at once)")


class KeyRotated(KeyCreated):
    replaced: KeyPublic = Field(description="the old key; its revoked_at is when it stops working")


class ErrorPublic(BaseModel):
    code: str
    message: str
    request_id: str | None = None


# --- export jobs and base models (routers/exports.py) ---------------------------------------------
class ExportOptions(Strict):
    ttl_seconds: int | None = Field(default=None, description="TTL of the output checkpoint")
    shard_bytes: int | None = Field(default=None, ge=1024 * 1024, description="merged: max bytes per output shard")


class ExportCreate(Strict):
    source: str = Field(description="tinker:// path of a sampler or full-state checkpoint")
    target: str = Field(description="peft or merged")
    base_model: str | None = Field(default=None, max_length=200, description="registered base model; default: the run's")
    output_name: str | None = Field(default=None, max_length=255)
    options: ExportOptions | None = None


class ExportBatchCreate(Strict):
    target: str = Field(description="peft or merged")
    sources: list[str] | None = Field(default=None, description="tinker:// paths (or use run_id + filters)")
    run_id: str | None = None
    kind: str | None = Field(default=None, description="sampler or training")
    name_pattern: str | None = Field(default=None, max_length=255, description="glob on checkpoint names, e.g. step-*")
    base_model: str | None = Field(default=None, max_length=200)
    options: ExportOptions | None = None


class ExportJobPublic(BaseModel):
    job_id: str
    batch_id: str | None
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    source: str | None
    target: str
    base_model: str | None
    output_path: str | None = Field(description="tinker:// path the output is (or will be) committed at")
    result: str | None = Field(description="tinker:// path of the committed output, once succeeded")
    progress_bytes: int
    total_bytes: int
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None
    verification: dict[str, Any] | None
    error: dict[str, Any] | None
    hub: HubCoordinatesPublic | None = Field(None, description="Hugging Face coordinates of the output")


class ExportJobsPublic(BaseModel):
    jobs: list[ExportJobPublic]
    total_count: int


class ExportBatchPublic(BaseModel):
    batch_id: str
    jobs: list[ExportJobPublic]


class BaseModelFileDecl(Strict):
    path: str = Field(min_length=1, max_length=255)
    size_bytes: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)


class BaseModelCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    files: list[BaseModelFileDecl] = Field(min_length=1, max_length=10_000)


class BaseModelPublic(BaseModel):
    name: str
    architecture: str | None
    size_bytes: int
    created_at: datetime
    files: list[BaseModelFileDecl] | None = None
    usage: dict[str, int] | None = None


class BaseModelsPublic(BaseModel):
    base_models: list[BaseModelPublic]


class BlobReceipt(BaseModel):
    sha256: str
    size_bytes: int
    sent: bool = Field(description="false when the bytes were already stored (nothing moved)")


# --- collector and retention (routers/gc.py) -------------------------------------------------------
Phase = Literal["expire", "invoices", "mark", "sweep", "orphans", "archives"]  # weightstore.collector.PHASES, as a schema type


def every_phase() -> list[Phase]:
    return list(get_args(Phase))


class GcRunPublic(BaseModel):
    id: str
    phases: list[str]
    dry_run: bool
    state: str
    started_at: datetime
    finished_at: datetime | None
    owner: str | None
    plan: dict[str, Any] | None
    stats: dict[str, Any] | None
    findings: list[dict[str, Any]] | None


class GcRunsPublic(BaseModel):
    runs: list[GcRunPublic]


class GcRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phases: list[Phase] = Field(default_factory=every_phase)
    dry_run: bool = False


class RestoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_seconds: int | None = None


class DefaultTTLUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    training_seconds: int | None = Field(None, description="Seconds; 0 removes the default; absent leaves it.")
    sampler_seconds: int | None = None


class DefaultTTLPublic(BaseModel):
    tenant: str
    training_seconds: int | None
    sampler_seconds: int | None


# --- billing (routers/billing.py) -----------------------------------------------------------------
class CurrentUsagePublic(BaseModel):
    at: datetime
    currency: str = "USD"
    hours_projected: int = HOURS_PER_MONTH
    rows: list[dict[str, Any]]
    total_logical_bytes: int
    total_projected_monthly_cost_usd: str
    physical_bytes_by_tenant: dict[str, int]
    not_billed_tenants: list[str] = Field(
        default_factory=list,
        description="operator tenants in this answer's scope, not billed: left out of all-tenant answers; "
        "asked for by name, their usage shows at $0 (weightstore.billing.billable)",
    )


class UsagePublic(BaseModel):
    start: datetime
    end: datetime
    bucket: str | None
    currency: str = "USD"
    rows: list[dict[str, Any]]
    total_byte_seconds: int
    total_cost_usd: str
    rounding: str = "each row rounded half-even to the cent; total = sum of rows"
    not_billed_tenants: list[str] = Field(
        default_factory=list,
        description="operator tenants in this answer's scope, not billed: left out of all-tenant answers; "
        "asked for by name, their usage shows at $0 (weightstore.billing.billable)",
    )


# --- collector reports (issue 12, part 6): every report names what it checked ------------------
class GcCheckedPublic(BaseModel):
    catalog: str
    """The catalog's SQLAlchemy URL, password hidden (``***``)."""
    store: str
    """The S3 endpoint URL."""
    bucket: str


class GcVerifyPublic(BaseModel):
    checked: GcCheckedPublic
    clean: bool
    stats: dict[str, int]
    findings: list[dict[str, str]]
    """Each ``{"kind", "subject", "detail", "severity"}`` (``error`` or ``warning``)."""


class GcLeasePublic(BaseModel):
    owner: str
    token: int
    heartbeat_at: datetime
    expires_at: datetime
    active: bool


class GcStatusPublic(BaseModel):
    checked: GcCheckedPublic
    lease: GcLeasePublic | None
    runs: list[GcRunPublic]


# --- trash and run detail (issue 12, parts 4 and 5) ----------------------------------------------
class TrashEntryPublic(BaseModel):
    tinker_path: str
    checkpoint_id: str
    kind: str
    size_bytes: int
    expired_at: datetime
    restorable_until: datetime = Field(description="Guaranteed: expired_at + the collector's grace period.")
    collected_by: datetime = Field(
        description="When the collector, on schedule, will have released it (restorable_until + its interval)."
    )


class TrashPublic(BaseModel):
    checkpoints: list[TrashEntryPublic]


class TrashRestoreCreate(Strict):
    path: str = Field(min_length=1, max_length=1000, description="tinker://RUN/KIND/NAME of an expired checkpoint.")
    ttl_seconds: int | None = Field(None, description="New TTL counted from now; absent = no expiry.")


class RunKindPublic(BaseModel):
    kind: str
    count: int
    size_bytes: int


class RunDetailPublic(RunPublic):
    checkpoint_count: int
    size_bytes: int
    kinds: list[RunKindPublic]
    active_exports: list[str]


class RunDeletedPublic(BaseModel):
    run_id: str
    checkpoints_deleted: int


# --- tenants (routers/tenants.py) -----------------------------------------------------------------
QuotaBytes = Annotated[int | None, Field(default=None, ge=0, description="bytes; null: no quota")]


class TenantCreate(Strict):
    name: str = Field(min_length=1, max_length=64, description="becomes the permanent id as well")
    price_per_gb_month_usd: float | None = Field(default=None, ge=0, description="price override; null: list price")
    quota_bytes: QuotaBytes = None
    soft_quota_bytes: QuotaBytes = None


class TenantUpdate(Strict):
    """Only the fields sent change; an explicit null clears a price override or a quota."""

    name: str | None = Field(default=None, min_length=1, max_length=64, description="new display name (the id stays)")
    price_per_gb_month_usd: float | None = Field(default=None, ge=0)
    quota_bytes: QuotaBytes = None
    soft_quota_bytes: QuotaBytes = None


class TenantPublic(BaseModel):
    tenant_id: str
    name: str
    state: str = Field(description="active, disabled or deleted")
    operator: bool = Field(description="the operator's own tenant: not billed")
    created_at: datetime
    price_per_gb_month_usd: float | None
    quota_bytes: int | None
    soft_quota_bytes: int | None
    used_bytes: int = Field(description="logical bytes counted against the quota: visible checkpoints + open uploads")
    stored_bytes: int
    reserved_bytes: int
    default_ttl_training_seconds: int | None
    default_ttl_sampler_seconds: int | None


class TenantsPublic(BaseModel):
    tenants: list[TenantPublic]


class TenantDeleted(TenantPublic):
    checkpoints_deleted: int
    keys_revoked: int
    uploads_aborted: int
    exports_cancelled: int


# --- retention policies and pins (weightstore.policies) -----------------------------------------
class RetentionPolicyUpdate(Strict):
    keep_last: int | None = Field(None, ge=1, le=1_000_000, description="keep the newest N checkpoints per kind")
    keep_every: int | None = Field(
        None, ge=1, le=1_000_000, description="keep every K-th checkpoint per kind, by creation order in (run, kind)"
    )


class RetentionPolicyPublic(BaseModel):
    scope: Literal["run", "tenant"] = Field(description="run: the run's own policy; tenant: the tenant default")
    tenant_id: str
    run_id: str | None
    keep_last: int | None
    keep_every: int | None
    rule: str = Field(description="the rules in words, e.g. 'keep_last=3, keep_every=10'")
    updated_at: datetime


class RetentionPoliciesPublic(BaseModel):
    policies: list[RetentionPolicyPublic]


class UnpinUpdate(Strict):
    ttl_seconds: int | None = Field(None, description="a new TTL from now; absent: none (its TTL before the pin is not restored)")


# --- DCP: ranks add files to an open upload (issue 14, part 2) ----------------------------------
class UploadFilesAdd(Strict):
    files: list[FileDeclaration] = Field(min_length=1)
    transfer: str = Field(default="stream", description="stream (through the service) or presigned (direct to S3)")


class UploadFilesPublic(BaseModel):
    upload_id: str
    files: list[FileAnswerPublic]


class UploadCommit(Strict):
    expect_files: list[str] | None = Field(
        default=None, description="the exact file set the committer expects; any difference refuses the commit"
    )
