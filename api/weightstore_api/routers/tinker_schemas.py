"""Wire schemas of the Tinker-compatible surface, shaped exactly like the ``tinker`` SDK's types
(0.38.0: ``tinker/types/*.py``). The SDK validates responses strictly: required fields must be
present, timestamps carry an offset, ``checkpoint_type`` is one of its three literals.

The one place for the surface's request bodies (``...Body``) and responses (``...Public``): both
``tinker`` (storage half) and ``tinker_sessions`` (session half) import them from here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CheckpointType = Literal["training", "sampler", "external"]


class TinkerBody(BaseModel):
    """Base of every Tinker request body: unknown fields ignored (the SDK adds ``type`` and fields
    of newer versions), known ones as strict as the native API's (the SDK sends proper JSON types;
    ``"7200"`` for an int is refused, not coerced — issue 11, item 6)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class CursorPublic(BaseModel):
    offset: int
    limit: int
    total_count: int


class TinkerCheckpointPublic(BaseModel):
    checkpoint_id: str = Field(description="`{segment}/{name}`, e.g. `weights/step-1`")
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str = Field(description="exactly `tinker://{run}/{checkpoint_id}`")
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class TinkerCheckpointsPublic(BaseModel):
    checkpoints: list[TinkerCheckpointPublic]
    cursor: CursorPublic | None = None


class TinkerRunPublic(BaseModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: TinkerCheckpointPublic | None = None
    last_sampler_checkpoint: TinkerCheckpointPublic | None = None
    user_metadata: dict[str, str] | None = None


class TinkerRunsPublic(BaseModel):
    training_runs: list[TinkerRunPublic]
    cursor: CursorPublic


class TTLBody(TinkerBody):
    ttl_seconds: int | None = Field(description="3600 s .. 10 years, or null to remove the expiry")


class TinkerPathBody(TinkerBody):
    tinker_path: str


class OptimizerConfigPublic(BaseModel):
    type: str = "adamw"


class WeightsInfoPublic(BaseModel):
    base_model: str
    optimizer_config: OptimizerConfigPublic = OptimizerConfigPublic()
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class CopyWeightsBody(TinkerBody):
    source_path: str
    session_id: str | None = None
    model_seq_id: int | None = None
    destination_project_id: str | None = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class CopyWeightsPublic(BaseModel):
    tinker_path: str


class ExternalWeightsUrlsPublic(BaseModel):
    urls: dict[str, str] = Field(description="file path inside the checkpoint -> presigned GET URL")
    expires: datetime


class ArchiveUrlPublic(BaseModel):
    url: str
    expires: datetime


class AuditEntryPublic(BaseModel):
    timestamp: datetime
    event: str
    event_details: dict[str, Any] = {}
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLogPublic(BaseModel):
    entries: list[AuditEntryPublic]


class SupportedModelPublic(BaseModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class ServerCapabilitiesPublic(BaseModel):
    supported_models: list[SupportedModelPublic]


# --- sessions and futures ----------------------------------------------------------------------


class CreateSessionBody(TinkerBody):
    tags: list[str] | None = None
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class CreateSessionPublic(BaseModel):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None


class SessionIdBody(TinkerBody):
    session_id: str


class FinishBody(TinkerBody):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoadWeightsBody(TinkerBody):
    path: str
    optimizer: bool = False
    session_id: str | None = None
    model_seq_id: int | None = None
    model_id: str | None = None
    seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, str] | None = None
    weights_access_token: str | None = None


class FuturePublic(BaseModel):
    request_id: str
    model_id: str | None = None


class ModelIdBody(TinkerBody):
    model_id: str


class ModelDataPublic(BaseModel):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoPublic(BaseModel):
    type: Literal["get_info"] = "get_info"
    model_data: ModelDataPublic
    model_id: str
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class SaveExternalBody(TinkerBody):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class RetrieveFutureBody(TinkerBody):
    request_id: str
    allow_metadata_only: bool = False


# --- billing (routers/billing.py) -----------------------------------------------------------------
class CurrentCheckpointStorageUsageItem(BaseModel):
    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: float | None = None


class CurrentCheckpointStorageUsageResponse(BaseModel):
    effective_rate_usd_per_gigabyte_month: float | None = None
    data: list[CurrentCheckpointStorageUsageItem]


# --- billing usage events (GET /api/v1/billing/usage/events; tinker/types/billing_usage_response.py) ---
class StorageBillingEventInfo(BaseModel):
    type: Literal["storage"] = "storage"
    free: bool = False
    gigabyte_hours: float


class CheckpointBillingEventInfo(BaseModel):
    type: Literal["checkpoint"] = "checkpoint"
    count: int


class BillingUsageEventPublic(BaseModel):
    bucket_start: datetime
    bucket_end: datetime
    base_model: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    session_id: str | None = None
    project_id: str | None = None
    estimated_cost_usd: float | None = None
    effective_rate_usd_per_million_tokens: float | None = None
    effective_rate_usd_per_gigabyte_month: float | None = None
    event_info: StorageBillingEventInfo | CheckpointBillingEventInfo = Field(discriminator="type")


class BillingUsageResponsePublic(BaseModel):
    data: list[BillingUsageEventPublic]
    sessions: dict[str, dict[str, Any]] = {}
    cost_data_through: datetime | None = None
