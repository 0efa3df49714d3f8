"""Presigned single PUTs straight to the blob key (docs/design.md, rule S3): the store checks the
signed SHA-256, the signed metadata names the writing upload, and the commit only HEADs the object.
These are the ways that could go wrong: claiming another tenant's blob without sending it, writing
wrong bytes over it, dropping the metadata, racing another uploader of the same bytes, the collector
deleting a PUT before its commit, and a client that cannot reach the store."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import urllib3

from tests.api.test_bad_input import assert_error, assert_nothing_stored, decl
from tests.helpers import sampler_files
from weightstore.client import Client
from weightstore.db import session_scope
from weightstore.models import Upload
from weightstore.objectstore import STAGING_PREFIX, blob_key
from weightstore.uploads import WRITER_META
from weightstore_gc import run as gc_run


def _declare(http: httpx.Client, run_id: str, name: str, files: dict[str, bytes]) -> dict:
    r = http.post(
        "/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": name, "transfer": "presigned", "files": decl(files)}
    )
    assert r.status_code == 201, r.text
    return r.json()


def _put_all(up: dict, files: dict[str, bytes]) -> None:
    for f in up["files"]:
        if f["transfer"] == "presigned":
            assert httpx.put(f["url"], content=files[f["path"]], headers=f["headers"]).status_code == 200


@pytest.fixture
def other(server, keys):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}) as c:
        yield c


def _run(http: httpx.Client) -> str:
    return str(http.post("/v1/runs", json={"base_model": "tiny-llama"}).json()["run_id"])


def test_direct_put_lands_at_the_blob_key_without_staging_or_copy(api, ctx):
    run_id, files = _run(api), sampler_files(11)
    up = _declare(api, run_id, "d", files)
    f = next(x for x in up["files"] if x["path"] == "adapter_model.safetensors")
    sha = hashlib.sha256(files[f["path"]]).hexdigest()
    assert f"/{blob_key(sha)}?" in f["url"] and not f["part_urls"]
    assert f["headers"][f"x-amz-meta-{WRITER_META}"] == up["upload_id"]
    _put_all(up, files)
    r = api.post(f"/v1/uploads/{up['upload_id']}/commit")
    assert r.status_code == 200, r.text
    assert r.json()["bytes_received"] == sum(len(v) for v in files.values())
    assert not list(ctx.store.list_keys(STAGING_PREFIX))
    assert ctx.store.head(blob_key(sha)).metadata[WRITER_META] == up["upload_id"]
    out = Client(str(api.base_url), api.headers["X-API-Key"]).read_file(r.json()["tinker_path"], f["path"])
    assert out == files[f["path"]]


def test_url_without_the_signed_metadata_is_refused(api):
    run_id, files = _run(api), sampler_files(12)
    up = _declare(api, run_id, "p", files)
    f = next(x for x in up["files"] if x["path"] == "adapter_model.safetensors")
    checksum_only = {k: v for k, v in f["headers"].items() if not k.startswith("x-amz-meta-")}
    assert httpx.put(f["url"], content=files[f["path"]], headers=checksum_only).status_code == 403
    forged = {**f["headers"], f"x-amz-meta-{WRITER_META}": "upl_someone_else"}
    assert httpx.put(f["url"], content=files[f["path"]], headers=forged).status_code == 403
    assert_error(api.post(f"/v1/uploads/{up['upload_id']}/commit"), 400, "upload_incomplete")
    assert_nothing_stored(api, run_id)


def test_another_tenants_blob_can_be_neither_claimed_nor_overwritten(api, other, ctx):
    files = sampler_files(13)
    mine = _run(api)
    first = _declare(api, mine, "orig", files)
    _put_all(first, files)
    assert api.post(f"/v1/uploads/{first['upload_id']}/commit").status_code == 200
    # The other tenant's answer for bytes that exist is shaped exactly like one for new bytes.
    theirs = _run(other)
    up = _declare(other, theirs, "steal", files)
    fresh = _declare(other, theirs, "fresh", sampler_files(14))
    shape = lambda a: sorted((f["path"], f["transfer"], sorted(f["headers"]), bool(f["part_urls"])) for f in a["files"])  # noqa: E731
    assert shape(up) == shape(fresh)
    # Committing without sending is refused: the object was written by another tenant's upload.
    assert_error(other.post(f"/v1/uploads/{up['upload_id']}/commit"), 400, "upload_incomplete")
    # Wrong bytes under its URL are refused by the store; the original blob is untouched.
    f = next(x for x in up["files"] if x["path"] == "adapter_model.safetensors")
    key = blob_key(f["sha256"])
    assert httpx.put(f["url"], content=b"\0" * len(files[f["path"]]), headers=f["headers"]).status_code >= 400
    assert ctx.store.head(key).metadata[WRITER_META] == first["upload_id"]
    assert hashlib.sha256(b"".join(ctx.store.iter_chunks(key))).hexdigest() == f["sha256"]
    assert_error(other.post(f"/v1/uploads/{up['upload_id']}/commit"), 400, "upload_incomplete")
    assert other.get("/v1/checkpoints", params={"run_id": theirs}).json()["checkpoints"] == []
    # Sending the real bytes proves possession: now it commits (the same bytes, stored once).
    _put_all(up, files)
    assert other.post(f"/v1/uploads/{up['upload_id']}/commit").status_code == 200


def test_racing_uploads_of_the_same_bytes(api, other):
    files = sampler_files(15)
    mine, theirs = _run(api), _run(other)
    # one tenant, two uploads (a step's state and sampler saves in parallel): either order commits
    a, b = _declare(api, mine, "a", files), _declare(api, mine, "b", files)
    _put_all(a, files)
    _put_all(b, files)  # b overwrote a's metadata with identical bytes
    assert api.post(f"/v1/uploads/{a['upload_id']}/commit").status_code == 200
    assert api.post(f"/v1/uploads/{b['upload_id']}/commit").status_code == 200
    # two tenants: the one overwritten by the other must send again (nothing proves it sent)
    files = sampler_files(16)
    x, y = _declare(api, mine, "x", files), _declare(other, theirs, "y", files)
    _put_all(x, files)
    _put_all(y, files)
    assert_error(api.post(f"/v1/uploads/{x['upload_id']}/commit"), 400, "upload_incomplete")
    assert other.post(f"/v1/uploads/{y['upload_id']}/commit").status_code == 200
    _put_all(x, files)
    assert api.post(f"/v1/uploads/{x['upload_id']}/commit").status_code == 200


def test_stores_that_do_not_verify_checksums_get_staging_keys(api, ctx):
    run_id = _run(api)
    ctx.settings = ctx.settings.model_copy(update={"s3_verifies_checksums": False})
    files = sampler_files(17)
    up = _declare(api, run_id, "s", files)
    assert all(f"/{STAGING_PREFIX}" in f["url"] for f in up["files"])
    _put_all(up, files)
    assert api.post(f"/v1/uploads/{up['upload_id']}/commit").status_code == 200


def test_collector_keeps_a_put_blob_while_its_upload_is_open(api, ctx, clock, keys):
    files = sampler_files(18)
    run_id = _run(api)
    up = _declare(api, run_id, "slow", files)
    _put_all(up, files)
    keys_ = [blob_key(f["sha256"]) for f in up["files"]]
    lease = ctx.settings.upload_lease_seconds  # a live client renews its upload's lease (issue 13, found 4)
    for _ in range(int((ctx.settings.gc_grace_seconds + 60) / (lease / 2)) + 1):
        clock.advance(lease / 2)  # older than grace, no blob row, upload still open
        assert api.post(f"/v1/uploads/{up['upload_id']}/renew").status_code == 200
    rep = gc_run(ctx)
    assert rep.stats["orphans"]["deleted_orphans"] == 0
    assert all(ctx.store.head(k) is not None for k in keys_)
    assert api.post(f"/v1/uploads/{up['upload_id']}/commit").status_code == 200
    # an abandoned one is garbage once its upload has expired
    files = sampler_files(19)
    gone = _declare(api, run_id, "abandoned", files)
    _put_all(gone, files)
    clock.advance(ctx.settings.upload_expiry_seconds + 1)
    gc_run(ctx)
    key = blob_key(hashlib.sha256(files["adapter_model.safetensors"]).hexdigest())
    clock.advance(ctx.settings.gc_grace_seconds + 60)
    gc_run(ctx)
    assert ctx.store.head(key) is None


def test_auto_transfer_falls_back_to_the_service_when_the_store_is_unreachable(server, keys, ctx, monkeypatch):
    real = urllib3.PoolManager.urlopen  # what the client's RawHTTP (not botocore) goes through
    calls = {"refused": 0}

    def refuse_puts(self, method, url, *args, **kw):  # type: ignore[no-untyped-def]
        if method == "PUT":  # fault injection: presigned URLs are not reachable from this "trainer"
            calls["refused"] += 1
            raise urllib3.exceptions.NewConnectionError(None, "connection refused")  # type: ignore[arg-type]
        return real(self, method, url, *args, **kw)

    monkeypatch.setattr(urllib3.PoolManager, "urlopen", refuse_puts)
    with Client(server.url, keys.trainer) as c:
        run_id = c.create_run("tiny-llama")["run_id"]
        res = c.upload(run_id, "sampler", "fb", sampler_files(20))
        assert res["bytes_received"] > 0 and calls["refused"] >= 1
        refused = calls["refused"]
        c.upload(run_id, "sampler", "fb2", sampler_files(21))  # remembered: straight to stream
        assert calls["refused"] == refused
        assert c.read_file(res["tinker_path"], "adapter_config.json") == sampler_files(20)["adapter_config.json"]
    with session_scope(ctx.engine) as s:
        states = sorted(u.state for u in s.query(Upload).filter(Upload.run_id == run_id))
    assert states == ["aborted", "committed", "committed"]  # the failed attempt was closed at once


def _big_weights(seed: int) -> dict[str, bytes]:
    import torch

    from weightstore import tensorio

    w = torch.randn(3 * 1024 * 1024, generator=torch.Generator().manual_seed(seed))  # 12 MiB > 5 MiB threshold
    return {"adapter_model.safetensors": tensorio.weights_bytes({"w": w}), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'}


def test_streamed_file_is_piped_into_one_checksummed_put(api, ctx):
    """Through the service, a file over the multipart threshold is piped into one PUT that the store
    verifies; wrong bytes, short bodies and a store that goes away leave nothing at the blob key."""
    from weightstore.objectstore import ObjectStore, S3Location

    run_id = _run(api)
    good, other_bytes = _big_weights(30), _big_weights(31)
    name = "adapter_model.safetensors"
    sha = hashlib.sha256(good[name]).hexdigest()

    def declare_stream(ck: str, files: dict[str, bytes], declared: dict[str, bytes] | None = None) -> dict:
        r = api.post(
            "/v1/uploads",
            json={"run_id": run_id, "kind": "sampler", "name": ck, "transfer": "stream", "files": decl(declared or files)},
        )
        assert r.status_code == 201, r.text
        return r.json()

    # wrong bytes (declared sha256 of `good`, sent `other_bytes` of the same size): the store refuses them
    up = declare_stream("wrong", good)
    assert_error(api.put(f"/v1/uploads/{up['upload_id']}/files/{name}", content=other_bytes[name]), 400, "integrity_mismatch")
    assert ctx.store.head(blob_key(sha)) is None
    # a short body: cut off before its declared length
    up = declare_stream("short", good)
    assert_error(api.put(f"/v1/uploads/{up['upload_id']}/files/{name}", content=good[name][:-1000]), 400, "integrity_mismatch")
    assert ctx.store.head(blob_key(sha)) is None
    # the store goes away: a retryable 503, nothing stored
    real = ctx.store
    ctx.store = ObjectStore(S3Location("http://127.0.0.1:9", "x", "y", real.bucket), connect_timeout=1, max_attempts=1)
    try:
        up = declare_stream("down", good)
        r = api.put(f"/v1/uploads/{up['upload_id']}/files/{name}", content=good[name])
        assert_error(r, 503, "store_unavailable")
    finally:
        ctx.store = real
    assert ctx.store.head(blob_key(sha)) is None
    assert_nothing_stored(api, run_id)
    # and the real thing: one object, no multipart, byte-identical
    up = declare_stream("ok", good)
    for f in up["files"]:
        assert api.put(f"/v1/uploads/{up['upload_id']}/files/{f['path']}", content=good[f["path"]]).status_code == 200
    assert api.post(f"/v1/uploads/{up['upload_id']}/commit").status_code == 200
    assert b"".join(ctx.store.iter_chunks(blob_key(sha))) == good[name]
    assert not list(ctx.store.list_multipart_uploads(""))


def test_client_sends_again_when_another_tenant_overwrote_its_put(server, keys, other, ctx, monkeypatch):
    """Fault injection: right after our PUT, another tenant's upload of identical bytes overwrites
    the object (its metadata now names that upload). The commit says upload_incomplete and re-offers
    the file at the upload's own staging key; the client sends it there and commits the same upload
    (issue 11, item 3; tests/core/test_concurrent_same_bytes.py has the rest)."""
    files = sampler_files(40)
    theirs = _declare(other, _run(other), "same-bytes", files)
    real = Client._send_once
    raced = {"done": False}

    def send_then_race(self, upload_id, answer, src, progress):  # type: ignore[no-untyped-def]
        real(self, upload_id, answer, src, progress)
        if not raced["done"]:
            raced["done"] = True
            _put_all(theirs, files)

    monkeypatch.setattr(Client, "_send_once", send_then_race)
    with Client(server.url, keys.trainer, transfer="presigned") as c:
        run_id = c.create_run("tiny-llama")["run_id"]
        res = c.upload(run_id, "sampler", "raced", files)
    assert raced["done"] and res["tinker_path"].endswith("/sampler_weights/raced")
    with session_scope(ctx.engine) as s:
        states = sorted(u.state for u in s.query(Upload).filter(Upload.run_id == run_id))
    assert states == ["committed"]
    assert not list(ctx.store.list_keys(STAGING_PREFIX))
