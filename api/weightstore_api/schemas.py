"""Request and response bodies of the native API (``XCreate`` / ``XPublic`` / ``XsPublic``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RunCreate(Strict):
    base_model: str = Field(min_length=1, max_length=200)
    run_id: str | None = Field(default=None, max_length=200)
    lora_rank: int | None = Field(default=None, ge=1, le=4096)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    user_metadata: dict[str, str] | None = None


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
    files: list[FileDeclaration] = Field(min_length=1)
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    transfer: str = Field(default="stream", description="stream (through the service) or presigned (direct to S3)")


class FileAnswerPublic(BaseModel):
    path: str
    size_bytes: int
    sha256: str
    transfer: str = Field(description="present (dedup: send nothing), stream or presigned")
    url: str | None = None
    headers: dict[str, str] = {}
    part_size: int | None = None
    part_urls: list[str] = []


class UploadPublic(BaseModel):
    upload_id: str
    expires_at: datetime
    tinker_path: str
    bytes_to_send: int
    files: list[FileAnswerPublic]


class FileReceipt(BaseModel):
    path: str
    size_bytes: int
    sha256: str


class CheckpointFilePublic(BaseModel):
    path: str
    size_bytes: int
    sha256: str


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
    files: list[CheckpointFilePublic] | None = None


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


class FileUrlsPublic(BaseModel):
    tinker_path: str
    files: list[FileUrlPublic]


class KeyCreate(Strict):
    tenant: str = Field(min_length=1, max_length=64)
    role: str = Field(description="trainer, reader or admin")
    name: str | None = Field(default=None, max_length=128)


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


class ErrorPublic(BaseModel):
    code: str
    message: str
    request_id: str | None = None
