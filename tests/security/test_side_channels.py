"""Issue 11, item 1: no answer tells a tenant anything about another tenant's state.

- Dedup oracle: declaring, sending and committing bytes another tenant stores (with any transfer
  mode) answers exactly as for bytes nobody stores, apart from ids and the caller's own sha256s.
- Base-model ``usage``: a non-admin key sees its own tenant's counts, an admin every tenant's.
- Run ids: every run-id operation (create, native get, Tinker get) answers for another tenant's id
  as for an id nobody holds, and a tenant cannot take (squat) an id in another tenant's namespace.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.api.test_bad_input import decl
from tests.helpers import ADAPTER_CONFIG, sampler_files
from weightstore import auth, db, runs
from weightstore.auth import Principal
from weightstore.models import BaseModel, Role
from weightstore.tinker import sessions as tinker_sessions

BIG = 6 * 1024 * 1024  # above the tests' multipart threshold (5 MiB): a stream of it is piped to the store


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def tenant_a(api: httpx.Client) -> httpx.Client:
    return api


@pytest.fixture
def tenant_b(server, keys) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}, timeout=60) as c:
        yield c


def files_for(seed: int) -> dict[str, bytes]:
    """A sampler checkpoint whose every file is unique to ``seed``, plus one file big enough to
    take the piped stream path."""
    config = json.dumps({**ADAPTER_CONFIG, "revision": f"seed-{seed}"}, sort_keys=True).encode()
    return {**sampler_files(seed), "adapter_config.json": config, "extra.bin": random.Random(seed).randbytes(BIG)}


def new_run(http: httpx.Client, **body: object) -> str:
    r = http.post("/v1/runs", json={"base_model": "tiny-llama", **body})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


def declare(http: httpx.Client, run_id: str, name: str, files: dict[str, bytes], transfer: str) -> dict:
    r = http.post(
        "/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": name, "transfer": transfer, "files": decl(files)}
    )
    assert r.status_code == 201, r.text
    return r.json()


def send(http: httpx.Client, up: dict, files: dict[str, bytes]) -> list[httpx.Response]:
    """Send every file the answer asks for, the way it says (presigned PUT or stream)."""
    out = []
    for f in up["files"]:
        if f["transfer"] == "presigned":
            r = httpx.put(f["url"], content=files[f["path"]], headers=f["headers"])
            assert r.status_code == 200, r.text
        elif f["transfer"] == "stream":
            out.append(http.put(f["url"], content=files[f["path"]]))
    return out


def store_as_tenant_a(http: httpx.Client, files: dict[str, bytes], transfer: str) -> None:
    up = declare(http, new_run(http), "orig", files, transfer)
    assert all(r.status_code == 200 for r in send(http, up, files))
    r = http.post(f"/v1/uploads/{up['upload_id']}/commit")
    assert r.status_code == 200, r.text


def normalised(r: httpx.Response, up: dict) -> tuple[int, str | None, str]:
    """Status, content type and body with the ids that must differ replaced: the upload id, the
    request id and the caller's own declared sha256s (by position)."""
    body = r.text
    for i, f in enumerate(up["files"]):
        body = body.replace(f["sha256"], f"<sha{i}>")
    body = body.replace(up["upload_id"], "<upload>")
    rid = r.json().get("request_id")
    if rid:
        body = body.replace(rid, "<request>")
    return r.status_code, r.headers.get("content-type"), body


def declare_shape(up: dict) -> list[tuple]:
    """What a declare answer says per file, minus ids, signatures and the caller's own sha256s."""
    out = []
    for i, f in enumerate(up["files"]):
        sha = f["sha256"]
        url = (f["url"] or "").split("?")[0].replace(f"{sha[:2]}/{sha}", f"<sha{i}>").replace(sha, f"<sha{i}>")
        url = url.replace(up["upload_id"], "<upload>")
        out.append((f["path"], f["transfer"], url, sorted(f["headers"]), len(f["part_urls"]), f["part_size"]))
    return out


# --- dedup oracle -------------------------------------------------------------------------------
@pytest.mark.parametrize("a_transfer", ["presigned", "stream"])
@pytest.mark.parametrize("b_transfer", ["presigned", "stream"])
def test_commit_without_sending_answers_the_same_whether_or_not_another_tenant_stores_the_bytes(
    tenant_a, tenant_b, a_transfer, b_transfer
):
    """issue 11, item 1 (dedup oracle): tenant B declares bytes it does not have, sends nothing and
    commits. The declare and commit answers for bytes tenant A stored (presigned or streamed) are
    byte-identical to those for bytes nobody stores, apart from ids and B's own sha256s."""
    held, fresh = files_for(1), files_for(2)
    store_as_tenant_a(tenant_a, held, a_transfer)
    run_b = new_run(tenant_b)
    up_held = declare(tenant_b, run_b, "held", held, b_transfer)
    up_fresh = declare(tenant_b, run_b, "fresh", fresh, b_transfer)
    assert declare_shape(up_held) == declare_shape(up_fresh)
    assert up_held["bytes_to_send"] == up_fresh["bytes_to_send"] == sum(map(len, held.values()))
    for _ in range(2):  # and again: a second commit must not tell them apart either
        r_held = tenant_b.post(f"/v1/uploads/{up_held['upload_id']}/commit")
        r_fresh = tenant_b.post(f"/v1/uploads/{up_fresh['upload_id']}/commit")
        assert r_held.status_code == 400 and r_held.json()["code"] == "upload_incomplete", r_held.text
        assert normalised(r_held, up_held) == normalised(r_fresh, up_fresh)


@pytest.mark.parametrize("a_transfer", ["presigned", "stream"])
def test_streaming_wrong_bytes_answers_the_same_whether_or_not_another_tenant_stores_them(tenant_a, tenant_b, a_transfer):
    """issue 11, item 1 (dedup oracle, stream): bytes that do not match the declared sha256 are
    refused with the same answer whether the blob exists (its bytes are only hashed) or not (they
    are piped to the store, which checks the checksum)."""
    held, fresh = files_for(3), files_for(4)
    store_as_tenant_a(tenant_a, held, a_transfer)
    run_b = new_run(tenant_b)
    up_held = declare(tenant_b, run_b, "held", held, "stream")
    up_fresh = declare(tenant_b, run_b, "fresh", fresh, "stream")
    wrong = {p: bytes(len(b)) for p, b in held.items()}  # same sizes, wrong bytes
    for r_held, r_fresh in zip(send(tenant_b, up_held, wrong), send(tenant_b, up_fresh, wrong), strict=True):
        assert r_held.status_code == 400 and r_held.json()["code"] == "integrity_mismatch", r_held.text
        assert normalised(r_held, up_held) == normalised(r_fresh, up_fresh)
    r_held = tenant_b.post(f"/v1/uploads/{up_held['upload_id']}/commit")
    r_fresh = tenant_b.post(f"/v1/uploads/{up_fresh['upload_id']}/commit")
    assert normalised(r_held, up_held) == normalised(r_fresh, up_fresh)


# --- base-model usage ---------------------------------------------------------------------------
def test_base_model_usage_is_counted_over_the_callers_tenant(ctx, server, keys, tenant_a):
    """issue 11, item 1 (base-model usage): after tenant A commits a checkpoint on a base model,
    a reader key of tenant B sees zero usage, A's reader sees A's, an admin sees everyone's."""
    now = ctx.clock.now()
    with db.session_scope(ctx.engine) as s:
        s.add(BaseModel(name="tiny-llama", architecture="LlamaForCausalLM", size_bytes=0, created_at=now))
        reader_b = auth.create_key(s, tenant="globex", role="reader", now=now)[1]
    run_a = new_run(tenant_a)
    files = sampler_files(5)
    up = declare(tenant_a, run_a, "s", files, "stream")
    send(tenant_a, up, files)
    assert tenant_a.post(f"/v1/uploads/{up['upload_id']}/commit").status_code == 200

    def usage(key: str) -> dict:
        r = httpx.get(f"{server.url}/v1/base-models/tiny-llama", headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    assert usage(reader_b) == {"checkpoints": 0, "active_jobs": 0}
    assert usage(keys.other_trainer) == {"checkpoints": 0, "active_jobs": 0}
    assert usage(keys.reader) == {"checkpoints": 1, "active_jobs": 0}
    assert usage(keys.admin) == {"checkpoints": 1, "active_jobs": 0}


# --- run ids ------------------------------------------------------------------------------------
def _not_found(r: httpx.Response, asked: str) -> tuple[int, str]:
    assert r.status_code == 404, r.text
    body = r.json()
    return r.status_code, (body["code"], body["message"].replace(asked, "<id>"))


def test_probing_another_tenants_run_id_answers_like_an_unused_id(tenant_a, tenant_b):
    """issue 11, item 1 (run ids): tenant B creating or looking up tenant A's run id (a chosen one
    and a server-minted one) gets the same answers as for ids nobody holds: create succeeds in B's
    own namespace, get is 404 on the native and the Tinker surface."""
    chosen = new_run(tenant_a, run_id="shared-name")
    minted = new_run(tenant_a)
    for held, unused in [(chosen, chosen.replace("shared-name", "never-used")), (minted, "0" * 8 + minted[8:])]:
        for asked in (held, unused):
            r = tenant_b.post("/v1/runs", json={"base_model": "tiny-llama", "run_id": asked})
            assert r.status_code == 201, r.text
            assert r.json()["run_id"] == f"globex:{asked}"  # placed in B's namespace, whoever holds `asked`
        assert _not_found(tenant_b.get(f"/v1/runs/{held}"), held) == _not_found(tenant_b.get(f"/v1/runs/{unused}"), unused)
        assert _not_found(tenant_b.get(f"/api/v1/training_runs/{held}"), held) == _not_found(
            tenant_b.get(f"/api/v1/training_runs/{unused}"), unused
        )
    # A's runs are untouched and still A's
    assert tenant_a.get(f"/v1/runs/{chosen}").json()["run_id"] == chosen == "acme:shared-name"
    assert tenant_a.get(f"/v1/runs/{minted}").status_code == 200


def test_a_tenant_cannot_squat_another_tenants_tinker_model_ids(ctx):
    """issue 11, item 1 (run ids, squatting): Tinker model ids ``{session}:train:{n}`` belong to the
    session's tenant. Another tenant asking for one gets it in its own namespace, so the owner's
    ``load_weights`` still makes exactly that model."""
    now = ctx.clock.now()
    with db.session_scope(ctx.engine) as s:
        for tenant in ("acme", "globex"):
            auth.create_key(s, tenant=tenant, role="trainer", now=now)
    acme = Principal("acme", "k1", Role.trainer)
    globex = Principal("globex", "k2", Role.trainer)
    with db.session_scope(ctx.engine) as s:
        sid = tinker_sessions.create_session(s, acme, now=now)
        own = runs.create_run(s, acme, base_model="tiny", now=now, run_id=f"{sid}:train:7")
        assert own.id == f"{sid}:train:7"  # the caller's own session: kept as asked
        squat = runs.create_run(s, globex, base_model="tiny", now=now, run_id=f"{sid}:train:0")
        assert squat.id == f"globex:{sid}:train:0"
        assert runs.create_run(s, globex, base_model="tiny", now=now, run_id="acme:x").id == "globex:acme:x"
        assert runs.create_run(s, acme, base_model="tiny", now=now, run_id="acme:x").id == "acme:x"
        assert runs.create_run(s, acme, base_model="tiny", now=now, run_id="y").id == "acme:y"
        assert re.fullmatch(r"[0-9a-f-]{36}:train:0", runs.create_run(s, acme, base_model="tiny", now=now).id)
