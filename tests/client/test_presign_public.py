"""Presigned URLs for a public S3 endpoint (issue 13, found 9, presign half): with
``WEIGHTSTORE_S3_PUBLIC_ENDPOINT`` set, URLs handed to trainers are signed for that host, while the
service's own calls keep the internal endpoint. The "public" endpoint here is a loopback forwarder
on another port in front of the test SeaweedFS: SigV4 signs the host, so a URL that works through it
proves it was signed for it (and the same URL pointed at the internal endpoint is refused)."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.client._tcpproxy import TcpProxy
from weightstore.objectstore import ObjectStore, S3Location, blob_key, store_from_settings
from weightstore.settings import Settings


@pytest.fixture
def public(s3_server):  # type: ignore[no-untyped-def]
    proxy = TcpProxy(int(urlsplit(s3_server.endpoint_url).port or 80))
    yield proxy
    proxy.kill()


def _store(s3_server, bucket: str, public_url: str | None) -> ObjectStore:  # type: ignore[no-untyped-def]
    loc = S3Location(s3_server.endpoint_url, s3_server.access_key, s3_server.secret_key, bucket, public_endpoint_url=public_url)
    return ObjectStore(loc)


def _host(url: str) -> str:
    return urlsplit(url).netloc


def test_presigned_urls_are_signed_for_the_public_endpoint(s3_server, s3_bucket, public):
    """issue 13, found 9: trainers reach the store by another name; the URLs they get work there."""
    store = _store(s3_server, s3_bucket, public.url)
    data = b"weights for the public endpoint"
    sha = hashlib.sha256(data).hexdigest()
    url, headers = store.presign_put(blob_key(sha), 60, sha256=sha, metadata={"weightstore-upload": "upl_x"})
    assert _host(url) == f"127.0.0.1:{public.port}"
    assert httpx.put(url, content=data, headers=headers).status_code == 200
    assert store.read_bytes(blob_key(sha)) == data  # the service reads it back through its internal endpoint

    get = store.presign_get(blob_key(sha), 60)
    assert _host(get) == f"127.0.0.1:{public.port}"
    assert httpx.get(get).content == data
    # The signature covers the host: the same URL sent to the internal endpoint is refused.
    internal = urlunsplit(urlsplit(get)._replace(netloc=_host(s3_server.endpoint_url)))
    assert httpx.get(internal).status_code == 403

    mpu = store.create_multipart("staging/upl_x/0")
    part = store.presign_part("staging/upl_x/0", mpu, 1, 60)
    assert _host(part) == f"127.0.0.1:{public.port}"
    assert httpx.put(part, content=b"p" * 1024).status_code == 200
    store.abort_multipart("staging/upl_x/0", mpu)


def test_the_services_own_traffic_keeps_the_internal_endpoint(s3_server, s3_bucket, public):
    """issue 13, found 9: with the public name unreachable from the service, its own writes
    (``put_stream`` sends to a presigned URL of its own) and reads still work."""
    store = _store(s3_server, s3_bucket, public.url)
    public.kill()
    data = b"x" * 4096
    sha = hashlib.sha256(data).hexdigest()
    store.put_stream(blob_key(sha), _Reader(data), len(data), sha256=sha)
    assert store.read_bytes(blob_key(sha)) == data


def test_unset_public_endpoint_signs_for_the_service_endpoint(s3_server, s3_bucket):
    store = _store(s3_server, s3_bucket, None)
    assert _host(store.presign_get("blobs/x", 60)) == _host(s3_server.endpoint_url)


def test_setting_reaches_the_store(s3_server):
    """``WEIGHTSTORE_S3_PUBLIC_ENDPOINT`` is the setting's environment name."""
    import os

    os.environ["WEIGHTSTORE_S3_PUBLIC_ENDPOINT"] = "http://s3.public.example:9000"
    try:
        s = Settings(s3_endpoint_url=s3_server.endpoint_url, s3_access_key_id="a", s3_secret_access_key="b")
    finally:
        del os.environ["WEIGHTSTORE_S3_PUBLIC_ENDPOINT"]
    store = store_from_settings(s)
    assert _host(store.presign_get("blobs/x", 60)) == "s3.public.example:9000"
    assert store.client.meta.endpoint_url == s3_server.endpoint_url


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out
