"""The one module that owns boto3: content-addressed blobs in an S3-compatible bucket.

Keys:
- ``blobs/sha256/<2 hex>/<64 hex>``: a blob, written once (conditional put), never modified;
- ``staging/<upload id>/<n>``: bytes a trainer sent as a presigned *multipart* upload (files
  over the single-PUT limit), or sent again to its own upload's key after a commit could not prove
  a direct PUT (another tenant's identical PUT replaced the writer metadata); verified at commit
  and then copied into place (or dropped when the blob key already holds the same bytes).

Presigned single PUTs go straight to the blob key, but only with the SHA-256 checksum and the
upload id (user metadata) inside the signature: the store refuses any other bytes, and the commit
reads back which upload wrote the object last, so a URL neither reveals nor lets anyone claim a
blob they did not send (docs/design.md, presigned uploads).

Presigned URLs are signed for ``public_endpoint_url`` when one is set (``WEIGHTSTORE_S3_PUBLIC_ENDPOINT``):
trainers reach the store by another name than the service does (a public load balancer, another
network). SigV4 signs the host, so a URL cannot be rewritten afterwards; a second boto3 client with
the public endpoint (same credentials and region) signs them, and never sends a request. The
service's own traffic, including ``put_stream``'s presigned PUT, keeps the internal endpoint.

Every botocore error is translated into the core hierarchy: connection problems and 5xx become
``StoreUnavailable`` (retryable), a missing key becomes ``NotFound``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from weightstore.errors import IntegrityError, InvalidRequest, NotFound, StoreUnavailable, WeightstoreError
from weightstore.settings import S3_MAX_OBJECT_BYTES, S3_MAX_PART_BYTES, S3_MAX_PARTS, S3_MIN_PART_BYTES

BLOB_PREFIX = "blobs/sha256/"
STAGING_PREFIX = "staging/"
READ_CHUNK = 8 * 1024 * 1024
MAX_DELETE_BATCH = 1000  # S3's DeleteObjects limit


def blob_key(sha256: str) -> str:
    return f"{BLOB_PREFIX}{sha256[:2]}/{sha256}"


def staging_key(upload_id: str, index: int | str) -> str:
    return f"{STAGING_PREFIX}{upload_id}/{index}"


def multipart_plan(size: int, preferred: int) -> tuple[int, int]:
    """(part size, part count) for a ``size``-byte multipart upload within S3's limits: at most
    10,000 parts, each 5 MiB..5 GiB. ``InvalidRequest`` naming the limit when no plan fits."""
    if size > S3_MAX_OBJECT_BYTES:
        raise InvalidRequest(
            f"{size} bytes is more than the object store can hold in one object "
            f"({S3_MAX_PARTS} parts of at most {S3_MAX_PART_BYTES} bytes = {S3_MAX_OBJECT_BYTES} bytes)"
        )
    part = min(max(preferred, S3_MIN_PART_BYTES, -(-size // S3_MAX_PARTS)), S3_MAX_PART_BYTES)
    return part, max(1, -(-size // part))


def checksum_b64(sha256: str) -> str:
    """A hex SHA-256 as S3 carries it (``x-amz-checksum-sha256``: base64 of the 32 bytes)."""
    return base64.b64encode(bytes.fromhex(sha256)).decode()


def sha256_from_key(key: str) -> str | None:
    if not key.startswith(BLOB_PREFIX):
        return None
    tail = key[len(BLOB_PREFIX) :].split("/")
    return tail[1] if len(tail) == 2 and len(tail[1]) == 64 else None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: Any
    checksum_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def stored_sha256_is(self, sha256: str) -> bool:
        """The store recorded (and, if it enforces checksums, verified) exactly this whole-object SHA-256."""
        return self.checksum_sha256 == checksum_b64(sha256)


@dataclass(frozen=True)
class S3Location:
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None
    bucket: str
    region: str = "us-east-1"
    public_endpoint_url: str | None = None
    """The endpoint presigned URLs are signed for (what clients reach); None: ``endpoint_url``."""


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Map botocore failures onto the core error hierarchy."""
    try:
        yield
    except WeightstoreError:
        raise
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}:
            raise NotFound(f"{what}: object not found") from exc
        if code in {"BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"}:
            raise IntegrityError(f"{what}: checksum mismatch ({code})") from exc
        if status >= 500 or status == 0 or code in {"SlowDown", "RequestTimeout", "ServiceUnavailable"}:
            raise StoreUnavailable(f"{what}: object store error {code or status}") from exc
        raise StoreUnavailable(f"{what}: object store refused the request ({code or status})") from exc
    except (EndpointConnectionError, BotoCoreError, ConnectionError, OSError) as exc:
        raise StoreUnavailable(f"{what}: object store unreachable ({type(exc).__name__})") from exc


class ObjectStore:
    """A bucket of content-addressed blobs. Thread-safe (boto3 clients are)."""

    def __init__(
        self,
        location: S3Location,
        *,
        max_pool_connections: int = 32,
        multipart_threshold: int = 64 * 1024 * 1024,
        part_size: int = 64 * 1024 * 1024,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 3,
    ) -> None:
        self.location = location
        self.bucket = location.bucket
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        cfg = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Only send/ask for checksums where we do so explicitly (SHA256 on blobs).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=location.endpoint_url,
            aws_access_key_id=location.access_key_id,
            aws_secret_access_key=location.secret_access_key,
            region_name=location.region,
            config=cfg,
        )
        # Signs presigned URLs only (no request goes through it): for the host clients use (module doc).
        self.presign_client = self.client
        if location.public_endpoint_url and location.public_endpoint_url != location.endpoint_url:
            self.presign_client = boto3.client(
                "s3",
                endpoint_url=location.public_endpoint_url,
                aws_access_key_id=location.access_key_id,
                aws_secret_access_key=location.secret_access_key,
                region_name=location.region,
                config=cfg,
            )
        self._raw: Any = None  # urllib3 pool for put_stream, made on first use
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size,
            max_concurrency=8,
            use_threads=True,
        )

    # --- bucket -------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Create the bucket if missing: only the bootstrap does this (``weightstore admin bootstrap``,
        or ``serve`` on the embedded catalog or store), so no other role needs create-bucket rights."""
        with translate_errors("create bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
            self.client.create_bucket(Bucket=self.bucket)

    def ping(self) -> None:
        """Is the store reachable and the bucket there? ``NotFound`` (saying how to create it) when
        the bucket is missing: every role but the bootstrap checks, never creates (``require_bucket``)."""
        with translate_errors("ping"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchBucket", "NotFound"}:
                    raise NotFound(
                        f"bucket {self.bucket} does not exist at {self.location.endpoint_url}: "
                        "create it with `weightstore admin bootstrap` (or set WEIGHTSTORE_S3_BUCKET)"
                    ) from exc
                raise

    require_bucket = ping

    # --- reads --------------------------------------------------------------------------------
    def head(self, key: str, *, checksum: bool = False) -> ObjectInfo | None:
        with translate_errors(f"head {key}"):
            try:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
                if checksum:
                    kwargs["ChecksumMode"] = "ENABLED"
                r = self.client.head_object(**kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                    return None
                raise
        return ObjectInfo(
            key, int(r["ContentLength"]), r.get("LastModified"), r.get("ChecksumSHA256"), dict(r.get("Metadata") or {})
        )

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def iter_chunks(self, key: str, *, start: int = 0, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        with translate_errors(f"get {key}"):
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if start:
                kwargs["Range"] = f"bytes={start}-"
            body = self.client.get_object(**kwargs)["Body"]
            try:
                while data := body.read(chunk):
                    yield data
            finally:
                body.close()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with translate_errors(f"get {key}"):
            r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            data: bytes = r["Body"].read()
            return data

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def hash_object(self, key: str) -> tuple[str, int]:
        """Server-side read: (sha256 hex, size). Parts are fetched in parallel, hashed in order."""
        info = self.head(key)
        if info is None:
            raise NotFound(f"{key}: object not found")
        h = hashlib.sha256()
        if info.size <= self.part_size:
            for data in self.iter_chunks(key):
                h.update(data)
            return h.hexdigest(), info.size
        ranges = [(o, min(self.part_size, info.size - o)) for o in range(0, info.size, self.part_size)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            # map() keeps order; at most ~4 parts are in flight beyond the one being hashed.
            for data in pool.map(lambda r: self.read_range(key, r[0], r[1]), ranges):
                h.update(data)
        return h.hexdigest(), info.size

    def download_file(self, key: str, path: str, *, callback: Callable[[int], None] | None = None) -> None:
        with translate_errors(f"download {key}"):
            self.client.download_file(self.bucket, key, path, Config=self.transfer_config, Callback=callback)

    def list_keys(self, prefix: str) -> Iterator[ObjectInfo]:
        with translate_errors(f"list {prefix}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []) or []:
                    yield ObjectInfo(obj["Key"], int(obj["Size"]), obj.get("LastModified"))

    # --- writes -------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None, if_absent: bool = False) -> bool:
        """Single PUT. With ``sha256`` the store verifies the body. With ``if_absent`` an existing
        object is left untouched and False is returned (content-addressed: same key, same bytes)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if sha256:
            kwargs["ChecksumSHA256"] = checksum_b64(sha256)
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        with translate_errors(f"put {key}"):
            try:
                self.client.put_object(**kwargs)
            except ClientError as exc:
                if if_absent and exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}:
                    return False
                raise
        return True

    def put_stream(self, key: str, body: Any, size: int, *, sha256: str, timeout: float = 300) -> None:
        """One PUT of ``size`` bytes read from ``body`` (anything with ``read``), which the store
        verifies against ``sha256`` before the object appears. Sent with urllib3 to a presigned URL:
        botocore signs a plain-HTTP payload by hashing it first, which a stream cannot afford."""
        import urllib3

        url, headers = self.presign_put(key, 600, sha256=sha256, public=False)  # the service's own PUT
        headers["Content-Length"] = str(size)
        if self._raw is None:
            self._raw = urllib3.PoolManager(maxsize=32, retries=False, timeout=urllib3.Timeout(connect=10, read=timeout))
        try:
            r = self._raw.request("PUT", url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"put {key}: object store unreachable ({type(exc).__name__})") from exc
        if r.status < 300:
            return
        detail = r.data[:500].decode("utf-8", "replace")
        if r.status == 400 and any(c in detail for c in ("BadDigest", "Checksum", "InvalidDigest")):
            raise IntegrityError(f"put {key}: the store refused bytes that do not match sha256 {sha256}")
        raise StoreUnavailable(f"put {key}: object store refused the request ({r.status})")

    def upload_fileobj(self, key: str, fileobj: IO[bytes], *, callback: Callable[[int], None] | None = None) -> None:
        with translate_errors(f"upload {key}"):
            self.client.upload_fileobj(fileobj, self.bucket, key, Config=self.transfer_config, Callback=callback)

    def copy(self, src: str, dst: str, size: int) -> None:
        """Server-side copy (multipart copy above 5 GiB, done by boto3's managed transfer)."""
        with translate_errors(f"copy {src} -> {dst}"):
            if size < 5 * 1024**3:
                self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src})
            else:
                self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst, Config=self.transfer_config)

    # multipart, driven by the service for streaming uploads and by clients through presigned URLs
    def create_multipart(self, key: str) -> str:
        with translate_errors(f"create multipart {key}"):
            return str(self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        with translate_errors(f"upload part {key}#{number}"):
            r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
            return str(r["ETag"])

    def list_parts(self, key: str, upload_id: str) -> list[dict[str, Any]]:
        with translate_errors(f"list parts {key}"):
            parts: list[dict[str, Any]] = []
            marker = 0
            while True:
                r = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
                parts.extend({"PartNumber": p["PartNumber"], "ETag": p["ETag"], "Size": p["Size"]} for p in r.get("Parts", []))
                if not r.get("IsTruncated"):
                    return parts
                marker = int(r["NextPartNumberMarker"])

    def complete_multipart(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        with translate_errors(f"complete multipart {key}"):
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]},
            )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with translate_errors(f"abort multipart {key}"):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in {"NoSuchUpload", "404"}:
                    raise

    def list_multipart_uploads(self, prefix: str = "") -> Iterator[dict[str, Any]]:
        with translate_errors("list multipart uploads"):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Uploads", []) or []

    # --- presigned URLs -----------------------------------------------------------------------
    def presign_get(self, key: str, expires: int, *, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        with translate_errors("presign"):
            return str(self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires))

    def presign_put(
        self,
        key: str,
        expires: int,
        *,
        sha256: str | None = None,
        metadata: dict[str, str] | None = None,
        public: bool = True,
    ) -> tuple[str, dict[str, str]]:
        """A presigned single PUT. With ``sha256`` the checksum header is part of the signature, so
        the store itself refuses a body whose SHA-256 differs; ``metadata`` (x-amz-meta-*) is signed
        too, so the object records exactly these values. Returns (url, headers the PUT must send).
        ``public=False``: signed for the internal endpoint (the service sends it itself)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        headers: dict[str, str] = {}
        if sha256:
            b64 = checksum_b64(sha256)
            params["ChecksumSHA256"] = b64
            headers["x-amz-checksum-sha256"] = b64
        if metadata:
            params["Metadata"] = dict(metadata)
            headers.update({f"x-amz-meta-{k}": v for k, v in metadata.items()})
        with translate_errors("presign"):
            signer = self.presign_client if public else self.client
            url = signer.generate_presigned_url("put_object", Params=params, ExpiresIn=expires)
        return str(url), headers

    def presign_part(self, key: str, upload_id: str, number: int, expires: int) -> str:
        with translate_errors("presign"):
            return str(
                self.presign_client.generate_presigned_url(
                    "upload_part",
                    Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number},
                    ExpiresIn=expires,
                )
            )

    # --- deletes ------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        with translate_errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_many(self, keys: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        """Batch delete, ≤1000 keys per call. Returns (deleted, {key: error}) — a failure leaves
        garbage behind, which the next collector run retries."""
        keys = list(keys)
        deleted: list[str] = []
        failed: dict[str, str] = {}
        for i in range(0, len(keys), MAX_DELETE_BATCH):
            batch = keys[i : i + MAX_DELETE_BATCH]
            with translate_errors("delete batch"):
                r = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": False}
                )
            deleted.extend(d["Key"] for d in r.get("Deleted", []) or [])
            for e in r.get("Errors", []) or []:
                failed[e["Key"]] = f"{e.get('Code')}: {e.get('Message')}"
        return deleted, failed


def store_from_settings(settings: Any) -> ObjectStore:
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return ObjectStore(
        S3Location(
            settings.s3_endpoint_url,
            settings.s3_access_key_id,
            secret,
            settings.s3_bucket,
            settings.s3_region,
            public_endpoint_url=settings.s3_public_endpoint,
        ),
        max_pool_connections=settings.s3_max_pool_connections,
        multipart_threshold=settings.multipart_threshold_bytes,
        part_size=settings.part_size_bytes,
    )
