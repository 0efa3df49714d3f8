"""Smoke tests for the test services themselves: if these fail, nothing else can be trusted.

They prove that the S3 store really authenticates (so later security tests are
meaningful), that presigned URLs are checked, that the embedded SeaweedFS only
listens on loopback, and that the PostgreSQL launcher gives a usable database.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

from tests.fixtures_services import S3Config
from tests.support.localpg import LocalPostgres
from weightstore.embedded import SeaweedFS

# A plain opener: loopback requests must not go through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_status(url: str) -> tuple[int, bytes]:
    try:
        with _HTTP.open(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def test_s3_auth_rejects_wrong_credentials(s3_server: S3Config, s3_bucket: str) -> None:
    good = s3_server.client()
    good.put_object(Bucket=s3_bucket, Key="hello.txt", Body=b"hello")
    assert good.get_object(Bucket=s3_bucket, Key="hello.txt")["Body"].read() == b"hello"

    wrong_secret = s3_server.client(secret_key=s3_server.secret_key + "x")
    with pytest.raises(ClientError) as caught:
        wrong_secret.get_object(Bucket=s3_bucket, Key="hello.txt")
    assert _error_code(caught.value) in {"SignatureDoesNotMatch", "AccessDenied"}
    with pytest.raises(ClientError):
        wrong_secret.put_object(Bucket=s3_bucket, Key="intruder.txt", Body=b"x")

    wrong_key = s3_server.client(access_key="AKIANOTAREALKEY00000")
    with pytest.raises(ClientError) as caught:
        wrong_key.list_objects_v2(Bucket=s3_bucket)
    assert _error_code(caught.value) in {"InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch"}

    # Anonymous (unsigned) requests must be refused too.
    status, _ = _http_status(f"{s3_server.endpoint_url}/{s3_bucket}/hello.txt")
    assert status == 403
    assert [o["Key"] for o in good.list_objects_v2(Bucket=s3_bucket).get("Contents", [])] == ["hello.txt"]


def test_presigned_get_and_tampering(s3_server: S3Config, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"payload-a")
    client.put_object(Bucket=s3_bucket, Key="b.bin", Body=b"payload-b")
    url = client.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "a.bin"}, ExpiresIn=300)

    assert _http_status(url) == (200, b"payload-a")

    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    signature = query["X-Amz-Signature"][0]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    tampered_sig = url.replace(f"X-Amz-Signature={signature}", f"X-Amz-Signature={flipped}")
    assert _http_status(tampered_sig)[0] == 403

    # Same signature, another object: the signature covers the path.
    other_key = urllib.parse.urlunsplit(parts._replace(path=parts.path.replace("a.bin", "b.bin")))
    assert _http_status(other_key)[0] == 403

    # Same signature, longer lifetime: the signature covers the expiry.
    longer = url.replace("X-Amz-Expires=300", "X-Amz-Expires=3000")
    assert _http_status(longer)[0] == 403


def test_multipart_upload(s3_server: S3Config, s3_bucket: str) -> None:
    client = s3_server.client()
    part_size = 5 * 1024 * 1024  # the S3 minimum for every part but the last
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="big.bin")
    bodies = [b"a" * part_size, b"b" * 1024]
    parts = []
    for number, body in enumerate(bodies, start=1):
        result = client.upload_part(Bucket=s3_bucket, Key="big.bin", UploadId=upload["UploadId"], PartNumber=number, Body=body)
        parts.append({"PartNumber": number, "ETag": result["ETag"]})
    client.complete_multipart_upload(
        Bucket=s3_bucket, Key="big.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert client.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].read() == b"".join(bodies)


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP listener owned by ``pid``, read from /proc (no `ss` needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = TCP_LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            # /proc prints each 32-bit word in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, len(addr_hex), 8))
            assert len(raw) == width
            found.append((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return found


def test_embedded_s3_listens_on_loopback_only(embedded_s3: SeaweedFS | None) -> None:
    if embedded_s3 is None or embedded_s3._proc is None:
        pytest.skip("external S3 endpoint in use")
    listeners = _listening_addresses(embedded_s3._proc.pid)
    ports = {port for _, port in listeners}
    assert embedded_s3.ports["s3"] in ports and embedded_s3.ports["s3"] + 10000 in ports
    exposed = [(a, p) for a, p in listeners if not ipaddress.ip_address(a).is_loopback]
    assert not exposed, f"SeaweedFS listens beyond loopback: {exposed}"


def test_postgres_select_1(pg_server: LocalPostgres, pg_url: str) -> None:
    assert pg_url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{pg_server.port}/")
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
            assert conn.execute(sa.text("show listen_addresses")).scalar_one() == "127.0.0.1"
    finally:
        engine.dispose()
