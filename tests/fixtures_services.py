"""pytest plugin: real S3 (SeaweedFS) and PostgreSQL services for the test session.

Loaded from ``tests/conftest.py`` with ``pytest_plugins = ["tests.fixtures_services"]``.

Fixtures
--------
``s3_server`` (session)
    :class:`S3Config` for a SeaweedFS started in a temporary directory with random
    credentials (auth on). To test against another S3 instead, set
    ``WEIGHTSTORE_TEST_S3_ENDPOINT_URL``, ``WEIGHTSTORE_TEST_S3_ACCESS_KEY`` and
    ``WEIGHTSTORE_TEST_S3_SECRET_KEY`` (optionally ``WEIGHTSTORE_TEST_S3_REGION``);
    nothing is started then.
``embedded_s3`` (session)
    The :class:`~weightstore.embedded.SeaweedFS` behind ``s3_server``, or ``None``
    when an external endpoint is used.
``s3_bucket`` (function)
    Name of a fresh, empty bucket on ``s3_server``; emptied and deleted afterwards.
``pg_server`` (session)
    A started :class:`~tests.support.localpg.LocalPostgres`. Tests using it are
    skipped when ``WEIGHTSTORE_TEST_PG=0``.
``pg_url`` (function)
    SQLAlchemy URL of a fresh database on ``pg_server``, dropped afterwards.

Services are started lazily, the first time a test asks for them, so a run that
selects only pure unit tests starts nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.localpg import LocalPostgres
from weightstore.embedded import SeaweedFS, ensure_bucket

__all__ = ["S3Config"]

_ENV_S3_ENDPOINT = "WEIGHTSTORE_TEST_S3_ENDPOINT_URL"
_ENV_S3_ACCESS = "WEIGHTSTORE_TEST_S3_ACCESS_KEY"
_ENV_S3_SECRET = "WEIGHTSTORE_TEST_S3_SECRET_KEY"
_ENV_S3_REGION = "WEIGHTSTORE_TEST_S3_REGION"
_ENV_PG = "WEIGHTSTORE_TEST_PG"


@dataclass(frozen=True)
class S3Config:
    """Where and how to reach the test S3 endpoint."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this endpoint (path-style); override keys to test auth failures."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            # SigV4 explicitly: for a custom endpoint in us-east-1 botocore still presigns
            # with legacy SigV2 unless told otherwise.
            config=Config(s3={"addressing_style": "path"}, **{"signature_version": "s3v4", **config}),
        )


@pytest.fixture(scope="session")
def embedded_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS | None]:
    if os.environ.get(_ENV_S3_ENDPOINT):
        yield None
        return
    # Fresh random credentials per session: nothing guessable, nothing shared between runs.
    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key="WSTEST" + secrets.token_hex(7).upper(),
        secret_key=secrets.token_urlsafe(30),
    )
    server.start()
    try:
        yield server
    finally:
        # Throw-away data: do not wait the full 15 s when a component is slow to exit.
        server.stop(grace=5.0)


@pytest.fixture(scope="session")
def s3_server(embedded_s3: SeaweedFS | None) -> S3Config:
    if embedded_s3 is None:
        endpoint = os.environ[_ENV_S3_ENDPOINT]
        access = os.environ.get(_ENV_S3_ACCESS)
        secret = os.environ.get(_ENV_S3_SECRET)
        if not access or not secret:
            pytest.fail(f"{_ENV_S3_ENDPOINT} is set, so {_ENV_S3_ACCESS} and {_ENV_S3_SECRET} must be set too")
        return S3Config(endpoint, access, secret, os.environ.get(_ENV_S3_REGION, "us-east-1"))
    return S3Config(embedded_s3.endpoint_url, embedded_s3.access_key, embedded_s3.secret_key)


def _empty_and_delete_bucket(client: Any, bucket: str) -> None:
    """Best effort: abort multipart uploads, delete every object, then the bucket."""
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    with contextlib.suppress(Exception):
        client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_bucket(s3_server: S3Config) -> Iterator[str]:
    bucket = f"ws-test-{uuid.uuid4().hex[:20]}"
    ensure_bucket(s3_server.endpoint_url, s3_server.access_key, s3_server.secret_key, bucket, region=s3_server.region)
    yield bucket
    _empty_and_delete_bucket(s3_server.client(), bucket)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    if os.environ.get(_ENV_PG, "1") == "0":
        pytest.skip(f"PostgreSQL tests disabled ({_ENV_PG}=0)")
    server = LocalPostgres()
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.fail(f"could not start PostgreSQL (set {_ENV_PG}=0 to skip these tests): {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: LocalPostgres) -> Iterator[str]:
    name = f"ws_test_{uuid.uuid4().hex[:16]}"
    url = pg_server.create_database(name)
    yield url
    # WITH (FORCE) in drop_database disconnects sessions a test left open.
    with contextlib.suppress(Exception):
        pg_server.drop_database(name)
