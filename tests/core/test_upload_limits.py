"""Cheap resource burn by an authenticated user (issue 11, item 5, all but user_metadata): part URLs
are signed lazily in bounded pages, file and upload sizes are derived from S3's real multipart
limits, and the legacy archive is built once per checkpoint instead of on every call."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.api.test_bad_input import assert_error, decl
from tests.helpers import sampler_files, state_files
from weightstore.client import Client
from weightstore.objectstore import STAGING_PREFIX, blob_key, multipart_plan
from weightstore.settings import S3_MAX_OBJECT_BYTES, S3_MAX_PART_BYTES, S3_MAX_PARTS, S3_MIN_PART_BYTES, Settings

TiB = 1024**4
MiB = 1024**2


def _run(http: httpx.Client) -> str:
    return str(http.post("/v1/runs", json={"base_model": "tiny-llama"}).json()["run_id"])


def _huge(sizes: dict[str, int]) -> list[dict]:
    small = decl(sampler_files(80))
    return [*small, *({"path": p, "size_bytes": n, "sha256": hashlib.sha256(p.encode()).hexdigest()} for p, n in sizes.items())]


def _declare(api: httpx.Client, run_id: str, name: str, files: list[dict]) -> httpx.Response:
    body = {"run_id": run_id, "kind": "sampler", "name": name, "transfer": "presigned", "files": files}
    return api.post("/v1/uploads", json=body)


def test_multipart_plan_follows_the_stores_real_limits():
    """Issue 11, item 5: every plan has at most 10,000 parts of 5 MiB..5 GiB; the largest storable
    file is exactly 10,000 x 5 GiB; one byte more is refused, naming the limit."""
    for size in [S3_MIN_PART_BYTES, 64 * MiB + 1, TiB, 48 * TiB + 17, S3_MAX_OBJECT_BYTES]:
        part, count = multipart_plan(size, 64 * MiB)
        assert S3_MIN_PART_BYTES <= part <= S3_MAX_PART_BYTES and count <= S3_MAX_PARTS
        assert (count - 1) * part < size <= count * part
    assert multipart_plan(S3_MAX_OBJECT_BYTES, 64 * MiB) == (S3_MAX_PART_BYTES, S3_MAX_PARTS)
    with pytest.raises(Exception, match="10000 parts"):
        multipart_plan(S3_MAX_OBJECT_BYTES + 1, 64 * MiB)
    with pytest.raises(ValueError):  # a configured maximum the store cannot hold fails at start
        Settings(max_file_bytes=64 * TiB)


def test_declaring_a_1tib_file_signs_one_bounded_page(api, ctx):
    """Issue 11, item 5: a 1 TiB file has 10,000 parts, but the declare answer signs at most
    presign_parts_batch URLs (so its body stays small); the rest come page by page, bounded too."""
    r = _declare(api, _run(api), "huge", _huge({"big.bin": TiB}))
    assert r.status_code == 201, r.text
    big = next(f for f in r.json()["files"] if f["path"] == "big.bin")
    batch = ctx.settings.presign_parts_batch
    assert big["part_count"] == S3_MAX_PARTS and big["part_size"] * S3_MAX_PARTS >= TiB
    assert len(big["part_urls"]) == batch and big["first_part"] == 1
    assert len(r.content) < 200 * batch + 64 * 1024
    url = f"/v1/uploads/{r.json()['upload_id']}/files/big.bin/transfer"
    page = api.get(url, params={"first_part": 9_990, "count": 1000}).json()
    assert page["first_part"] == 9_990 and len(page["part_urls"]) == 11  # the last page ends at part 10,000
    assert len(api.get(url, params={"first_part": 5, "count": 1000}).json()["part_urls"]) == batch
    assert_error(api.get(url, params={"first_part": S3_MAX_PARTS + 1}), 400, "invalid_request")
    assert api.delete(f"/v1/uploads/{r.json()['upload_id']}").status_code == 204


def test_files_and_uploads_the_store_cannot_hold_are_refused_at_declare(api, ctx):
    """Issue 11, item 5: 64 TiB used to be accepted (with parts over S3's 5 GiB limit); now a file
    over 10,000 x 5 GiB, an upload over max_upload_bytes and one needing more than max_upload_parts
    presigned parts are each refused with a 400 that names the limit."""
    run_id = _run(api)
    r = _declare(api, run_id, "too-big", _huge({"big.bin": 64 * TiB}))
    assert_error(r, 400, "invalid_request")
    assert str(S3_MAX_OBJECT_BYTES) in r.json()["message"] and "5 GiB" in r.json()["message"]
    r = _declare(api, run_id, "too-much", _huge({"a.bin": 30 * TiB, "b.bin": 30 * TiB}))
    assert_error(r, 400, "invalid_request")
    assert "at most" in r.json()["message"]
    ctx.settings = ctx.settings.model_copy(update={"max_upload_parts": 15_000})
    r = _declare(api, run_id, "too-many-parts", _huge({"a.bin": TiB, "b.bin": TiB}))
    assert_error(r, 400, "invalid_request")
    assert "15000" in r.json()["message"]
    assert api.get("/v1/checkpoints", params={"run_id": run_id}).json()["checkpoints"] == []
    assert not list(ctx.store.list_multipart_uploads(""))  # refused before any multipart upload started


def test_presigned_multipart_with_paged_part_urls_round_trips(server, keys, ctx, monkeypatch):
    """Issue 11, item 5: with a small part size and a page of 2 URLs, a 6-part file is sent through
    three pages (the client asks for each as it goes) and reads back byte-identical."""
    ctx.settings = ctx.settings.model_copy(update={"single_put_max_bytes": 0, "presign_parts_batch": 2})
    big = os.urandom(5 * S3_MIN_PART_BYTES + 12345)
    files = {**sampler_files(81), "big.bin": big}
    pages: list[int] = []
    real = Client._call

    def spy(self, method, url, **kw):  # type: ignore[no-untyped-def]
        if url.endswith("/transfer"):
            pages.append(kw["params"]["first_part"])
        return real(self, method, url, **kw)

    monkeypatch.setattr(Client, "_call", spy)
    with Client(server.url, keys.trainer, transfer="presigned", hash_cache=False) as c:
        run_id = c.create_run("tiny-llama")["run_id"]
        res = c.upload(run_id, "sampler", "paged", files)
        assert c.read_file(res["tinker_path"], "big.bin") == big
    assert pages == [3, 5]
    assert ctx.store.read_bytes(blob_key(hashlib.sha256(big).hexdigest())) == big
    assert not list(ctx.store.list_keys(STAGING_PREFIX)) and not list(ctx.store.list_multipart_uploads(""))


def test_a_second_archive_call_reads_no_checkpoint_bytes(server, keys, ctx, monkeypatch):
    """Issue 11, item 5: the legacy archive endpoint used to re-read and re-hash every file of the
    checkpoint on each call. It is now recorded per checkpoint (archive_cache) and reused while its
    blob is live: the second call makes no object-store GET; once the archive blob is gone it is
    rebuilt, identical."""
    with Client(server.url, keys.trainer) as c:
        run_id = c.create_run("tiny-llama", lora_rank=4)["run_id"]
        c.upload(run_id, "training", "step-1", state_files(3))
    gets: list[str] = []
    store = ctx.store
    for name in ["iter_chunks", "read_range", "read_bytes", "hash_object", "download_file"]:
        real = getattr(store, name)

        def counted(*a, _real=real, _name=name, **kw):  # type: ignore[no-untyped-def]
            gets.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(store, name, counted)
    url = f"{server.url}/api/v1/training_runs/{run_id}/checkpoints/weights/step-1/archive"
    headers = {"X-API-Key": keys.reader, "accept": "application/json"}

    def call() -> bytes:
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200, r.text
        return httpx.get(r.json()["url"]).content

    first = call()
    assert gets, "the first call builds the archive from the checkpoint's files"
    gets.clear()
    assert call() == first
    assert gets == []
    sha = hashlib.sha256(first).hexdigest()
    store.delete(blob_key(sha))  # as if the collector reclaimed it
    assert call() == first and gets
