"""Two tenants saving identical bytes at the same time with presigned transfers (issue 11, item 3).

A presigned single PUT goes straight to the blob key with the upload id as signed metadata (rule
S3); a concurrent identical PUT of another tenant replaces that metadata, so the first commit
cannot prove its tenant sent the bytes. The class: "a correct, fully-sent save fails because someone
else wrote the same content". The fix: such a commit answers ``upload_incomplete`` (identical to
"never sent") and re-offers the file at the upload's own staging key, which no one else can write;
the next commit HEADs it (the store verified its checksum), keeps the blob key when it already
holds the bytes, else copies. Tests run against the real SeaweedFS the suite starts."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.test_bad_input import decl
from tests.helpers import sampler_files
from weightstore import auth, db
from weightstore.client import Client
from weightstore.db import session_scope
from weightstore.models import Upload
from weightstore.objectstore import STAGING_PREFIX, blob_key
from weightstore.uploads import WRITER_META

pytestmark = pytest.mark.timeout(240)


def _run(http: httpx.Client) -> str:
    return str(http.post("/v1/runs", json={"base_model": "tiny-llama"}).json()["run_id"])


def _declare(http: httpx.Client, run_id: str, name: str, files: dict[str, bytes]) -> dict:
    body = {"run_id": run_id, "kind": "sampler", "name": name, "transfer": "presigned", "files": decl(files)}
    r = http.post("/v1/uploads", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _put(answer: dict, data: bytes) -> None:
    r = httpx.put(answer["url"], content=data, headers=answer["headers"])
    assert r.status_code == 200, r.text


@pytest.fixture
def other(server, keys):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}, timeout=60) as c:
        yield c


def test_interleaved_identical_puts_of_two_tenants_both_commit(api, other, ctx):
    """Issue 11, item 3 (deterministic interleaving): A PUT, B PUT, A commit. A's commit answers
    upload_incomplete exactly as for bytes never sent, names the file, and re-offers it at A's own
    staging key; a PUT there (which B cannot overwrite) proves possession and A commits; the blob
    is stored once, the staging key is gone, both tenants read the same bytes back."""
    files = sampler_files(71)
    a, b = _declare(api, _run(api), "a", files), _declare(other, _run(other), "b", files)
    for f in a["files"]:
        _put(f, files[f["path"]])
    for f in b["files"]:
        _put(f, files[f["path"]])  # B overwrote A's writer metadata with identical bytes
    r = api.post(f"/v1/uploads/{a['upload_id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "upload_incomplete", r.text
    assert sorted(r.json()["details"]["files"]) == sorted(files)
    # The same answer as for bytes nobody ever stored (other content, same file names).
    never = _declare(api, _run(api), "never", sampler_files(75))
    r_never = api.post(f"/v1/uploads/{never['upload_id']}/commit")
    assert {**r_never.json(), "request_id": None} == {**r.json(), "request_id": None}
    # Re-offered at A's own staging key, checksum signed, no writer metadata needed there.
    again = {p: api.get(f"/v1/uploads/{a['upload_id']}/files/{p}/transfer").json() for p in files}
    for t in again.values():
        assert t["transfer"] == "presigned" and f"/{STAGING_PREFIX}{a['upload_id']}/" in t["url"], t
        assert "x-amz-checksum-sha256" in t["headers"] and f"x-amz-meta-{WRITER_META}" not in t["headers"]
    for f in b["files"]:
        _put(f, files[f["path"]])  # B races again: it cannot touch A's staging key
    for p, t in again.items():
        _put(t, files[p])
    done = api.post(f"/v1/uploads/{a['upload_id']}/commit")
    assert done.status_code == 200, done.text
    assert other.post(f"/v1/uploads/{b['upload_id']}/commit").status_code == 200
    assert not list(ctx.store.list_keys(STAGING_PREFIX))
    for data in files.values():
        assert ctx.store.read_bytes(blob_key(hashlib.sha256(data).hexdigest())) == data
    with Client(str(api.base_url), api.headers["X-API-Key"]) as c:
        assert c.read_file(done.json()["tinker_path"], "adapter_model.safetensors") == files["adapter_model.safetensors"]


def test_staging_put_of_wrong_bytes_proves_nothing(api, other, ctx):
    """The re-offered staging URL is checksum-signed: other bytes are refused by the store, and the
    commit keeps answering upload_incomplete until the real bytes arrive (S1, S3 still hold)."""
    files = sampler_files(72)
    a, b = _declare(api, _run(api), "a", files), _declare(other, _run(other), "b", files)
    for f in b["files"]:
        _put(f, files[f["path"]])
    assert api.post(f"/v1/uploads/{a['upload_id']}/commit").json()["code"] == "upload_incomplete"
    t = api.get(f"/v1/uploads/{a['upload_id']}/files/adapter_model.safetensors/transfer").json()
    bad = b"\0" * len(files["adapter_model.safetensors"])
    assert httpx.put(t["url"], content=bad, headers=t["headers"]).status_code >= 400
    r = api.post(f"/v1/uploads/{a['upload_id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "upload_incomplete"
    assert api.get("/v1/checkpoints").json()["checkpoints"] == []


def test_client_save_succeeds_when_every_blob_key_put_is_raced(server, keys, other, ctx, monkeypatch):
    """Issue 11, item 3 (client): another tenant's identical PUT lands right after every PUT of
    ours to a blob key. The client's one re-declare could not outrun that; now the commit loop
    re-sends the unproven files to the upload's own staging keys and the save succeeds in one upload."""
    files = sampler_files(73)
    theirs = _declare(other, _run(other), "same", files)
    real = Client._send_once
    raced = {"n": 0}

    def send_then_race(self, upload_id, answer, src, progress):  # type: ignore[no-untyped-def]
        real(self, upload_id, answer, src, progress)
        for f in theirs["files"]:
            _put(f, files[f["path"]])
        raced["n"] += 1

    monkeypatch.setattr(Client, "_send_once", send_then_race)
    with Client(server.url, keys.trainer, transfer="presigned") as c:
        run_id = c.create_run("tiny-llama")["run_id"]
        res = c.upload(run_id, "sampler", "raced", files)
        assert c.read_file(res["tinker_path"], "adapter_config.json") == files["adapter_config.json"]
    assert raced["n"] == 2 * len(files)  # each file sent twice: blob key, then its own staging key
    with session_scope(ctx.engine) as s:
        assert [u.state for u in s.query(Upload).filter(Upload.run_id == run_id)] == ["committed"]
    assert not list(ctx.store.list_keys(STAGING_PREFIX))


def test_many_clients_of_three_tenants_save_identical_bytes_at_once(server, keys, ctx, monkeypatch):
    """Issue 11, item 3 (load): 12 clients in 3 tenants save the same checkpoint at the same time;
    a barrier holds every commit until every first PUT has landed, so the blob key's writer is one
    upload and every other tenant's first commit cannot prove itself, and a fourth tenant keeps
    re-PUTting the same bytes throughout. Every save succeeds and every tenant reads the bytes back."""
    tenants = {"acme": keys.trainer, "globex": keys.other_trainer}
    with db.session_scope(ctx.engine) as s:
        tenants["initech"] = auth.create_key(s, tenant="initech", role="trainer", now=ctx.clock.now())[1]
    clients_per_tenant = 4
    n = clients_per_tenant * len(tenants)
    files = sampler_files(74)
    barrier = threading.Barrier(n, timeout=120)
    first_commit: set[int] = set()
    real = Client._call

    def wait_before_first_commit(self, method, url, **kw):  # type: ignore[no-untyped-def]
        if method == "POST" and url.endswith("/commit") and id(self) not in first_commit:
            first_commit.add(id(self))
            barrier.wait()
        return real(self, method, url, **kw)

    monkeypatch.setattr(Client, "_call", wait_before_first_commit)

    def save(i: int) -> tuple[str, str, bytes]:
        key = list(tenants.values())[i % len(tenants)]
        with Client(server.url, key, transfer="presigned", hash_cache=False) as c:
            run_id = c.create_run("tiny-llama")["run_id"]
            path = c.upload(run_id, "sampler", f"same-{i}", files)["tinker_path"]
            return key, path, c.read_file(path, "adapter_model.safetensors")

    # And a fourth tenant keeps PUTting the same bytes to the blob keys the whole time.
    with db.session_scope(ctx.engine) as s:
        racer_key = auth.create_key(s, tenant="hooli", role="trainer", now=ctx.clock.now())[1]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": racer_key}, timeout=60) as racer:
        racing = _declare(racer, _run(racer), "racer", files)
    stop = threading.Event()

    def race() -> None:
        while not stop.is_set():
            for f in racing["files"]:
                _put(f, files[f["path"]])

    racer_thread = threading.Thread(target=race, daemon=True)
    racer_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(save, range(n)))
    finally:
        stop.set()
        racer_thread.join(timeout=30)
    assert len(results) == n
    assert all(data == files["adapter_model.safetensors"] for _, _, data in results)
    for key, path, _ in results:  # each tenant reads its own checkpoint back through a fresh client
        with Client(server.url, key) as c:
            assert c.read_file(path, "adapter_config.json") == files["adapter_config.json"]
    assert not list(ctx.store.list_keys(STAGING_PREFIX))


def test_a_put_by_another_upload_of_the_same_tenant_proves_possession(api, other, ctx):
    """The rule the reliability harness met (CI seed 1249045743): a commit that sent nothing is
    accepted when the blob key's last writer is another upload of the SAME tenant (that upload's PUT
    proves the tenant holds the bytes), and refused exactly as for never-stored bytes when the last
    writer is another tenant's upload. The second half is the dedup oracle of issue 11, item 1."""
    files = sampler_files(74)
    run = _run(api)
    sender, prober = _declare(api, run, "sender", files), _declare(api, run, "prober", files)
    for f in sender["files"]:
        _put(f, files[f["path"]])  # only the sender PUTs; the prober sends nothing
    ok = api.post(f"/v1/uploads/{prober['upload_id']}/commit")
    assert ok.status_code == 200, ok.text

    theirs = sampler_files(76)
    b = _declare(other, _run(other), "b", theirs)
    for f in b["files"]:
        _put(f, theirs[f["path"]])
    probe = _declare(api, run, "probe", theirs)
    refused = api.post(f"/v1/uploads/{probe['upload_id']}/commit")
    never = _declare(api, run, "never", sampler_files(77))
    refused_never = api.post(f"/v1/uploads/{never['upload_id']}/commit")
    assert refused.status_code == 400 and refused.json()["code"] == "upload_incomplete"
    assert {**refused.json(), "request_id": None} == {**refused_never.json(), "request_id": None}
