"""Per-tenant hard quota checked at declare, soft threshold in /metrics (issue 12, part 2)."""

from __future__ import annotations

import threading

import httpx

from tests.api.test_bad_input import assert_error, decl, save
from tests.helpers import sampler_files


def _size(files: dict[str, bytes]) -> int:
    return sum(len(b) for b in files.values())


def _declare(api: httpx.Client, run_id: str, name: str, files: dict[str, bytes], **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    return api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": name, "files": decl(files), **extra})


def test_quota_exceeded_is_a_permanent_400_naming_used_requested_and_limit(server, keys, api):  # type: ignore[no-untyped-def]
    """issue 12, part 2: past the quota, declare answers 400 quota_exceeded (never 413/429/5xx) with
    used, requested and limit; open uploads count; an abort frees their bytes; deleting frees room."""
    files = sampler_files(1)
    size = _size(files)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        assert admin.patch("/v1/tenants/acme", json={"quota_bytes": 2 * size + 10}).status_code == 200
    run_id = api.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    assert save(api, run_id, files, name="one").status_code == 200
    open_upload = _declare(api, run_id, "two", sampler_files(2))  # declared, not committed: it counts
    assert open_upload.status_code == 201, open_upload.text
    other = sampler_files(3)
    r = _declare(api, run_id, "three", other)
    assert_error(r, 400, "quota_exceeded")
    assert r.json()["message"] == (
        f"tenant acme quota exceeded: {2 * size} bytes used + {_size(other)} requested > {2 * size + 10} bytes limit "
        "(delete checkpoints or ask an admin to raise the quota)"
    )
    assert r.json()["details"] == {
        "used_bytes": 2 * size,
        "requested_bytes": _size(other),
        "replaced_bytes": 0,
        "quota_bytes": 2 * size + 10,
    }
    assert api.delete(f"/v1/uploads/{open_upload.json()['upload_id']}").status_code in (200, 204)
    assert _declare(api, run_id, "three", other).status_code == 201
    # the globex tenant has no quota: unaffected
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}) as globex:
        grun = globex.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
        assert _declare(globex, grun, "big", sampler_files(4)).status_code == 201


def test_concurrent_declares_never_overshoot_the_quota(server, keys, api):  # type: ignore[no-untyped-def]
    """issue 12, part 2 (the quota race): N declares at once against a quota that fits exactly K of
    them → exactly K succeed and the rest get quota_exceeded (SQLite and PostgreSQL via ``db_url``)."""
    n, k = 8, 3
    files = sampler_files(5)
    size = _size(files)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        assert admin.patch("/v1/tenants/acme", json={"quota_bytes": k * size + size // 2}).status_code == 200
    run_id = api.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    barrier = threading.Barrier(n)
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def declare(i: int) -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.trainer}, timeout=60) as c:
            barrier.wait()
            r = _declare(c, run_id, f"race-{i}", files)
            with lock:
                answers.append((r.status_code, r.json().get("code", "ok") if r.status_code != 201 else "ok"))

    threads = [threading.Thread(target=declare, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [(201, "ok")] * k + [(400, "quota_exceeded")] * (n - k)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        assert admin.get("/v1/tenants/acme").json()["reserved_bytes"] == k * size


def test_soft_and_hard_quota_gauges_in_metrics(server, keys, api):  # type: ignore[no-untyped-def]
    """issue 12, part 2: /metrics exports used bytes, the quotas and used/quota per tenant, on scrape."""
    files = sampler_files(6)
    size = _size(files)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        assert admin.patch("/v1/tenants/acme", json={"quota_bytes": 4 * size, "soft_quota_bytes": 2 * size}).status_code == 200
    run_id = api.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    assert save(api, run_id, files, name="m").status_code == 200
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    assert f'weightstore_tenant_used_bytes{{tenant="acme"}} {float(size)}' in lines
    assert 'weightstore_tenant_used_bytes{tenant="globex"} 0.0' in lines
    assert f'weightstore_tenant_quota_bytes{{tenant="acme"}} {float(4 * size)}' in lines
    assert 'weightstore_tenant_quota_used_ratio{tenant="acme"} 0.25' in lines
    assert 'weightstore_tenant_soft_quota_used_ratio{tenant="acme"} 0.5' in lines
    assert not [x for x in lines if x.startswith("weightstore_tenant_quota_used_ratio") and "globex" in x]


def _committed_total(server) -> float:  # type: ignore[no-untyped-def]
    prefix = 'weightstore_checkpoints_committed_total{kind="sampler"} '
    lines = [x for x in httpx.get(server.url + "/metrics").text.splitlines() if x.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_a_repeated_commit_counts_once_in_metrics(server, api):  # type: ignore[no-untyped-def]
    """issue 13 (left in stop 17): a commit repeated after a lost answer (the client's failover sends it
    again, to any replica) answers the first commit's result and must not count a second checkpoint."""
    run_id = api.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    files = sampler_files(7)
    up = api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "once", "files": decl(files)}).json()
    for f in up["files"]:
        if f["transfer"] == "stream":
            assert api.put(f["url"], content=files[f["path"]]).status_code == 200
    before = _committed_total(server)
    first = api.post(f"/v1/uploads/{up['upload_id']}/commit")
    assert first.status_code == 200, first.text
    assert _committed_total(server) == before + 1
    again = api.post(f"/v1/uploads/{up['upload_id']}/commit")
    assert again.status_code == 200 and again.json()["tinker_path"] == first.json()["tinker_path"]
    assert _committed_total(server) == before + 1
