"""Bad input: a clear 4xx with a stable code, nothing stored, nothing lost (issue 2's list)."""

from __future__ import annotations

import hashlib
import json
import struct
import threading

import httpx
import pytest

from tests.helpers import sampler_files
from weightstore.objectstore import ObjectStore, S3Location


def st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def decl(files: dict[str, bytes]) -> list[dict]:
    return [{"path": p, "size_bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in files.items()]


@pytest.fixture
def run_id(api: httpx.Client) -> str:
    r = api.post("/v1/runs", json={"base_model": "tiny", "lora_rank": 4})
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def save(
    api: httpx.Client,
    run_id: str,
    files: dict[str, bytes],
    name: str = "ck",
    kind: str = "sampler",
    declared: list[dict] | None = None,
    **extra,
) -> httpx.Response:
    """Declare, stream every file, commit. Returns the first failing response (or the commit)."""
    r = api.post("/v1/uploads", json={"run_id": run_id, "kind": kind, "name": name, "files": declared or decl(files), **extra})
    if r.status_code != 201:
        return r
    up = r.json()
    for f in up["files"]:
        if f["transfer"] == "stream":
            put = api.put(f["url"], content=files[f["path"]])
            if put.status_code != 200:
                return put
    return api.post(f"/v1/uploads/{up['upload_id']}/commit")


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code, body
    assert body["message"] and body["request_id"]


def assert_nothing_stored(api: httpx.Client, run_id: str) -> None:
    assert api.get("/v1/checkpoints", params={"run_id": run_id}).json()["checkpoints"] == []


def with_weights(data: bytes) -> dict[str, bytes]:
    files = sampler_files()
    files["adapter_model.safetensors"] = data
    return files


F32_4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "exceeds"),
        (struct.pack("<Q", 50) + b"{}", "past the end"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (st_bytes({"a": F32_4, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6), "overlaps"),
        (st_bytes({"a": F32_4}, b"\0" * 8), "cover"),
        (st_bytes({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
        (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "its shape needs"),
    ],
    ids=["truncated", "header-cap", "header-past-end", "bad-json", "overlap", "gap", "dtype", "shape"],
)
def test_malformed_safetensors_refused(api, run_id, data, fragment):
    r = save(api, run_id, with_weights(data))
    assert_error(r, 400, "invalid_format")
    assert fragment in r.json()["message"]
    assert_nothing_stored(api, run_id)


def test_bad_adapter_config_refused(api, run_id):
    files = sampler_files()
    files["adapter_config.json"] = json.dumps({"r": 0, "lora_alpha": 8}).encode()
    assert_error(save(api, run_id, files), 400, "invalid_format")
    assert_nothing_stored(api, run_id)


@pytest.mark.parametrize("path", ["../escape.json", "/etc/passwd", "a/../../b.json", "a\\b.json", "./x.json", "a//b"])
def test_path_traversal_refused(api, run_id, path):
    files = {**sampler_files(), path: b"{}"}
    assert_error(save(api, run_id, files), 400, "invalid_path")
    assert_nothing_stored(api, run_id)


@pytest.mark.parametrize("name", ["a/b", "..", "x" * 200, "sp ace", ""])
def test_bad_checkpoint_names_refused(api, run_id, name):
    r = save(api, run_id, sampler_files(), name=name)
    assert r.status_code == 400, r.text
    assert r.json()["code"] in {"invalid_name", "invalid_request"}


def test_duplicate_file_names_refused(api, run_id):
    files = sampler_files()
    declared = decl(files) + decl({"adapter_config.json": files["adapter_config.json"]})
    assert_error(save(api, run_id, files, declared=declared), 400, "invalid_request")


def test_declared_sha_or_size_mismatch_refused(api, run_id):
    files = sampler_files()
    bad_sha = decl(files)
    bad_sha[0]["sha256"] = "0" * 64
    assert_error(save(api, run_id, files, declared=bad_sha), 400, "integrity_mismatch")
    bad_size = decl(files)
    bad_size[0]["size_bytes"] -= 1
    assert_error(save(api, run_id, files, declared=bad_size), 400, "integrity_mismatch")
    assert_nothing_stored(api, run_id)


def test_presigned_put_with_wrong_bytes_rejected_by_store(api, run_id):
    files = sampler_files()
    up = api.post(
        "/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "p", "transfer": "presigned", "files": decl(files)}
    ).json()
    f = next(x for x in up["files"] if x["path"] == "adapter_model.safetensors")
    tampered = bytearray(files[f["path"]])
    tampered[-1] ^= 0xFF
    assert httpx.put(f["url"], content=bytes(tampered), headers=f["headers"]).status_code >= 400
    assert_error(api.post(f"/v1/uploads/{up['upload_id']}/commit"), 400, "upload_incomplete")
    assert_nothing_stored(api, run_id)


def test_unknown_kind_and_overwrite_sampler_refused(api, run_id):
    assert_error(save(api, run_id, sampler_files(), kind="merged"), 400, "invalid_request")
    assert_error(save(api, run_id, sampler_files(), overwrite=True), 400, "invalid_request")


def test_ttl_bounds(api, run_id):
    assert_error(save(api, run_id, sampler_files(), ttl_seconds=10), 400, "invalid_ttl")
    assert_error(save(api, run_id, sampler_files(), ttl_seconds=11 * 365 * 86400), 400, "invalid_ttl")


def test_expired_upload_cannot_commit(api, run_id, clock, ctx):
    files = sampler_files()
    up = api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "late", "files": decl(files)}).json()
    clock.advance(ctx.settings.upload_expiry_seconds + 1)
    assert_error(api.post(f"/v1/uploads/{up['upload_id']}/commit"), 400, "upload_expired")
    assert_nothing_stored(api, run_id)


def test_foreign_tenant_ids_look_missing(api, server, keys, run_id):
    assert save(api, run_id, sampler_files()).status_code == 200
    up = api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "x2", "files": decl(sampler_files(1))}).json()
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}) as other:
        for url in (
            f"/v1/runs/{run_id}",
            f"/v1/checkpoints/{run_id}/sampler_weights/ck",
            f"/v1/checkpoints/{run_id}/sampler_weights/ck/files",
        ):
            foreign, missing = other.get(url), other.get(url.replace(run_id, "nope:train:0"))
            assert foreign.status_code == missing.status_code == 404
            assert foreign.json()["code"] == missing.json()["code"] == "not_found"
        assert_error(other.delete(f"/v1/checkpoints/{run_id}/sampler_weights/ck"), 404, "not_found")
        assert_error(other.post(f"/v1/uploads/{up['upload_id']}/commit"), 404, "not_found")
        assert_error(
            other.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "z", "files": decl(sampler_files())}),
            404,
            "not_found",
        )
    assert len(api.get("/v1/checkpoints", params={"run_id": run_id}).json()["checkpoints"]) == 1


def test_revoked_and_reader_keys(api, server, keys, run_id):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.reader}) as reader:
        assert reader.get("/v1/checkpoints").status_code == 200
        assert_error(reader.post("/v1/runs", json={"base_model": "x"}), 403, "forbidden")
        assert_error(
            reader.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "r", "files": decl(sampler_files())}),
            403,
            "forbidden",
        )
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        created = admin.post("/v1/keys", json={"tenant": "acme", "role": "trainer"}).json()
        assert admin.delete(f"/v1/keys/{created['key_id']}").status_code == 200
    with httpx.Client(base_url=server.url, headers={"X-API-Key": created["api_key"]}) as revoked:
        assert_error(revoked.get("/v1/checkpoints"), 401, "unauthenticated")
    assert_error(httpx.get(server.url + "/v1/checkpoints", headers={"X-API-Key": "tml-nope"}), 401, "unauthenticated")
    assert_error(httpx.get(server.url + "/v1/checkpoints"), 401, "unauthenticated")


def test_store_down_is_503_and_leaves_nothing(api, run_id, ctx):
    files = sampler_files(7)
    up = api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "down", "files": decl(files)}).json()
    real = ctx.store
    ctx.store = ObjectStore(S3Location("http://127.0.0.1:9", "x", "y", real.bucket), connect_timeout=1, max_attempts=1)
    try:
        f = up["files"][0]
        r = api.put(f["url"], content=files[f["path"]])
        assert_error(r, 503, "store_unavailable")
        assert r.headers["Retry-After"]
        assert_error(api.post(f"/v1/uploads/{up['upload_id']}/commit"), 400, "upload_incomplete")
    finally:
        ctx.store = real
    assert_nothing_stored(api, run_id)
    # once the store is back, the same upload completes
    assert save(api, run_id, files, name="down").status_code == 200


def test_concurrent_commits_of_one_name_exactly_one_wins(api, run_id):
    uploads = []
    for seed in (1, 2):
        files = sampler_files(seed)
        up = api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "race", "files": decl(files)}).json()
        for f in up["files"]:
            assert api.put(f["url"], content=files[f["path"]]).status_code == 200
        uploads.append(up["upload_id"])
    results: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def commit(uid: str) -> None:
        barrier.wait()
        results.append(api.post(f"/v1/uploads/{uid}/commit"))

    threads = [threading.Thread(target=commit, args=(u,)) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 400]
    loser = next(r for r in results if r.status_code == 400)
    assert loser.json()["code"] == "already_exists"
    assert len(api.get("/v1/checkpoints", params={"run_id": run_id}).json()["checkpoints"]) == 1
