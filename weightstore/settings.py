"""Settings: one validated pydantic-settings class, every field overridable by a ``WEIGHTSTORE_`` env var.

Tests build ``Settings(...)`` directly with the values they need; the service builds it once at
start-up (``get_settings()``) so a bad value fails the start, not the first request.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HOUR = 3600
TEN_YEARS = 10 * 365 * 24 * HOUR  # Tinker's documented upper bound for ttl_seconds
MiB = 1024 * 1024
GiB = 1024 * MiB
# S3's multipart limits (AWS documents them; SeaweedFS and MinIO keep them): at most 10,000 parts,
# each 5 MiB..5 GiB (the last may be smaller). The largest object a multipart upload can make is
# therefore 10,000 x 5 GiB = 50,000 GiB (about 48.8 TiB); a larger file cannot be stored at all.
S3_MAX_PARTS = 10_000
S3_MIN_PART_BYTES = 5 * MiB
S3_MAX_PART_BYTES = 5 * GiB
S3_MAX_OBJECT_BYTES = S3_MAX_PARTS * S3_MAX_PART_BYTES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WEIGHTSTORE_", extra="ignore")

    # --- service -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("var")
    """Where the embedded default keeps its SQLite file, S3 data and generated credentials."""
    public_url: str | None = None
    """Base URL clients use to reach this service (for streaming upload URLs); default http://host:port."""
    log_level: str = "INFO"
    log_json: bool = True

    # --- catalog -------------------------------------------------------------------------------
    database_url: str | None = None
    """SQLAlchemy URL. Unset: SQLite at ``data_dir/weightstore.db``."""
    auto_migrate: bool = True
    """``serve`` applies migrations at start (embedded default). In production set it false and run
    ``weightstore migrate`` once per release, so replicas never race on a schema change."""

    # --- object store --------------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    """Unset: the service starts an embedded SeaweedFS on loopback under ``data_dir/s3``."""
    s3_public_endpoint: str | None = None
    """The S3 endpoint trainers reach (``WEIGHTSTORE_S3_PUBLIC_ENDPOINT``): presigned URLs are signed
    for it, while the service's own calls use ``s3_endpoint_url``. Unset: presigned URLs name
    ``s3_endpoint_url`` (trainers must reach the service's endpoint)."""
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_bucket: str = "weightstore"
    s3_region: str = "us-east-1"
    s3_max_pool_connections: int = Field(32, ge=1)
    multipart_threshold_bytes: int = Field(64 * MiB, ge=5 * MiB)
    """Files at least this large are uploaded/copied in parts."""
    part_size_bytes: int = Field(64 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)
    single_put_max_bytes: int = Field(5 * 1024 * MiB, ge=0, le=5 * 1024 * MiB)
    """Presigned uploads of files up to this size are one PUT straight to the blob key, checked by
    the store's SHA-256 checksum (no copy, no read-back at commit); larger files go in parts to a
    staging key that the commit re-hashes and copies. 5 GiB is S3's single-PUT limit."""
    chunk_size_bytes: int = Field(16 * MiB, ge=64 * 1024, le=1024 * MiB)
    """Blobs get one sha256 per slice of this size, recorded at commit beside the whole-file sha256
    (issue 14): loaders fetch and verify chunks in parallel. Recorded per blob, so changing it only
    affects blobs hashed afterwards."""
    s3_verifies_checksums: bool = True
    """The store enforces ``x-amz-checksum-sha256`` on PUT (AWS S3, SeaweedFS, MinIO do). Set false
    for a store that does not: presigned single PUTs then go to staging keys and are re-hashed."""
    presign_ttl_seconds: int = Field(900, ge=1, le=7 * 24 * HOUR)
    """Lifetime of presigned GET/PUT URLs: short on purpose, a leaked URL is a leaked checkpoint."""

    # --- uploads & formats ---------------------------------------------------------------------
    upload_expiry_seconds: int = Field(24 * HOUR, ge=1)
    """The longest an upload may stay open, however often its client renews it; then it is closed
    and its staged bytes become garbage."""
    upload_lease_seconds: int = Field(10 * 60, ge=1)
    """An open upload is a lease for this long, renewed by its client while it sends
    (``POST /v1/uploads/{id}/renew``, and every transfer page and commit). A client that dies stops
    renewing: the collector closes the upload one lease later and its blobs are no longer pinned."""
    max_files_per_checkpoint: int = Field(256, ge=1)
    max_file_bytes: int = Field(S3_MAX_OBJECT_BYTES, ge=1, le=S3_MAX_OBJECT_BYTES)
    """Largest declared file. At most what S3 multipart can store (10,000 parts x 5 GiB = 50,000 GiB);
    lower it for stores with a smaller object limit (AWS S3 allowed 5 TiB per object until 2025)."""
    max_upload_bytes: int = Field(S3_MAX_OBJECT_BYTES, ge=1)
    """Largest total of declared file sizes in one upload (a declare is a lease on every sha256 it
    names and may start one multipart upload per file; this bounds what one request can reserve)."""
    max_upload_parts: int = Field(20_000, ge=1)
    """Most presigned multipart parts one upload may declare in total (each is a URL to sign, lazily)."""
    presign_parts_batch: int = Field(100, ge=1, le=1000)
    """Part URLs signed per request: the declare answer holds at most this many in total (first files
    first), and ``GET /v1/uploads/{id}/files/{path}/transfer`` pages the rest out this many at a time.
    Signing is CPU (~0.1-0.3 ms each); an answer is never more than a few hundred KB."""
    max_safetensors_header_bytes: int = Field(100 * MiB, ge=8)
    """safetensors' own reader refuses headers over 100 MB; we refuse them before reading them."""
    max_json_file_bytes: int = Field(64 * MiB, ge=1)
    """JSON files are parsed whole at commit; tokenizer.json of real models reaches ~10 MB."""
    name_max_length: int = Field(128, ge=1, le=255)
    max_json_body_bytes: int = Field(2 * MiB, ge=1024)
    """Largest JSON request body any route accepts (413 ``too_large`` above it); bodies are also
    held to ``weightstore.formats.MAX_JSON_DEPTH``. A 256-file upload declaration is ~100 KB."""

    # --- TTL & garbage collection --------------------------------------------------------------
    ttl_min_seconds: int = Field(HOUR, ge=1)
    ttl_max_seconds: int = Field(TEN_YEARS, ge=1)
    gc_grace_seconds: int = Field(6 * HOUR, ge=0)
    """A blob must be unreferenced this long before it may be deleted (protects in-flight saves)."""
    gc_interval_seconds: int = Field(15 * 60, ge=1)
    gc_lease_seconds: int = Field(120, ge=1)
    gc_delete_batch: int = Field(1000, ge=1, le=1000)
    embedded_gc: bool = True
    """Run the collector inside ``weightstore serve`` (embedded default); disable when a separate
    ``weightstore gc`` worker runs."""

    # --- export jobs ---------------------------------------------------------------------------
    embedded_worker: bool = True
    worker_lease_seconds: int = Field(120, ge=1)
    export_shard_bytes: int = Field(2 * 1024 * MiB, ge=MiB)

    # --- health & readiness --------------------------------------------------------------------
    health_port: int = Field(0, ge=0, le=65535)
    """``WEIGHTSTORE_HEALTH_PORT``: a standalone collector (``weightstore gc worker``) or export
    worker (``weightstore worker``) serves ``/healthz``, ``/readyz`` and ``/metrics`` on this port
    (on ``host``). 0: off. The API serves them on its own port."""
    readiness_write_probe_seconds: float = Field(30.0, ge=0)
    """``/readyz`` writes and deletes a tiny object (under ``health/``, never listed by the
    collector) at most this often and reports ``object_store_write`` when it fails: a store that
    answers reads but refuses writes is not ready. 0: no write probe."""
    readiness_write_probe_timeout_seconds: float = Field(5.0, gt=0)
    """A write probe slower than this is a readiness failure (``object_store_write``)."""

    # --- billing -------------------------------------------------------------------------------
    price_per_gb_month_usd: float = Field(0.10, ge=0)
    price_per_kind_usd: dict[str, float] = Field(default_factory=dict)
    """Optional per-kind override, e.g. ``{"training": 0.12}``."""

    # --- admin UI ------------------------------------------------------------------------------
    session_secret: SecretStr | None = None
    """``WEIGHTSTORE_SESSION_SECRET``: keys the admin UI's CSRF tokens, so every replica must share
    it. Required when the catalog is not the embedded SQLite one (``serve`` refuses to start
    without it); unset with the embedded catalog: generated once and kept in ``data_dir/session-secret``."""
    initial_admin_key: SecretStr | None = None
    """``WEIGHTSTORE_INITIAL_ADMIN_KEY``: an operator-provided ``tml-`` key (from a secret store) that
    the bootstrap installs as the first admin key instead of generating one. Stored hashed, like
    every key; ignored once an admin key exists (``weightstore admin bootstrap --rotate`` replaces)."""
    cookie_secure: bool = False
    """Mark admin UI cookies ``Secure`` on every request (they are anyway when the request is https)."""
    admin_session_lifetime_seconds: int = Field(12 * 3600, ge=60)
    """An admin UI session ends this long after sign-in, however active (sign-out ends it at once)."""
    admin_session_idle_seconds: int = Field(3600, ge=60)
    """An admin UI session ends after this long without a page view."""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.ttl_min_seconds > self.ttl_max_seconds:
            raise ValueError("ttl_min_seconds must not exceed ttl_max_seconds")
        if self.initial_admin_key is not None and not _is_api_key(self.initial_admin_key.get_secret_value()):
            raise ValueError("initial_admin_key must look like an API key: tml- then at least 32 url-safe characters")
        if (self.s3_endpoint_url is None) != (self.s3_access_key_id is None) and self.s3_access_key_id:
            raise ValueError("s3_access_key_id is set but s3_endpoint_url is not")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'weightstore.db').resolve()}"

    @property
    def catalog_is_embedded(self) -> bool:
        """A SQLite catalog: one host, one ``serve`` that bootstraps itself (migrations, bucket, first
        admin key). Any other catalog is shared by replicas that must not race to create anything:
        the one-shot ``weightstore admin bootstrap`` does that."""
        return self.resolved_database_url.startswith("sqlite")

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def _is_api_key(key: str) -> bool:
    """``tml-`` then 32..196 url-safe characters (what ``auth`` generates is 43; 32 is 192 bits)."""
    body = key.removeprefix("tml-")
    return key.startswith("tml-") and 32 <= len(body) <= 196 and all(c.isascii() and (c.isalnum() or c in "-_") for c in body)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
