"""Retention policies and pins through the native API and the CLI (issue 12, part 3)."""

from __future__ import annotations

import json

import httpx
from typer.testing import CliRunner

from tests.collector._util import assert_verified, new_run, principal, save
from tests.helpers import sampler_files
from weightstore.names import TinkerPath
from weightstore_cli import app

HOUR = 3600


def _saved(ctx, clock, keys, n: int) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    paths = []
    for i in range(1, n + 1):
        paths.append(save(ctx, p, run_id, f"s{i:03d}", sampler_files(i), ttl=HOUR))
        clock.advance(1)
    return run_id, paths


def _url(path: str) -> str:
    p = TinkerPath.parse(path)
    return f"/v1/checkpoints/{p.run_id}/{p.checkpoint_id}"


def test_api_round_trip_policies_pins_and_checkpoint_fields(api, server, keys, ctx, clock):
    """issue 12, part 3: set/show/clear a run policy and a tenant default, pin/unpin, and both shown
    with each checkpoint (``pinned``, ``retention``); ownership and validation answers."""
    run_id, paths = _saved(ctx, clock, keys, 3)
    r = api.get(_url(paths[0]))
    assert r.status_code == 200 and r.json()["pinned"] is False and r.json()["retention"] is None
    r = api.put("/v1/tenants/acme/retention", json={"keep_last": 5})
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "tenant" and r.json()["keep_last"] == 5 and r.json()["run_id"] is None
    r = api.put(f"/v1/runs/{run_id}/retention", json={"keep_last": 2, "keep_every": 10})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("scope", "run_id", "keep_last", "keep_every", "rule")} == {
        "scope": "run",
        "run_id": run_id,
        "keep_last": 2,
        "keep_every": 10,
        "rule": "keep_last=2, keep_every=10",
    }
    assert api.get(f"/v1/runs/{run_id}/retention").json()["scope"] == "run"
    listed = api.get("/v1/checkpoints", params={"run_id": run_id}).json()["checkpoints"]
    assert [c["retention"]["scope"] for c in listed] == ["run", "run", "run"]
    assert api.get(_url(paths[1])).json()["retention"]["keep_last"] == 2
    assert [(p["scope"], p["keep_last"]) for p in api.get("/v1/retention").json()["policies"]] == [("tenant", 5), ("run", 2)]

    r = api.post(_url(paths[0]) + "/pin")
    assert r.status_code == 200 and r.json()["pinned"] is True and r.json()["expires_at"] is None
    r = api.put(_url(paths[0]) + "/ttl", json={"ttl_seconds": 2 * HOUR})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request" and "pinned" in r.json()["message"]
    r = api.post(_url(paths[0]) + "/unpin", json={"ttl_seconds": 2 * HOUR})
    assert r.status_code == 200 and r.json()["pinned"] is False
    assert r.json()["expires_at"] is not None

    r = api.delete(f"/v1/runs/{run_id}/retention")
    assert r.status_code == 200 and r.json()["scope"] == "tenant"  # what applies now
    assert api.delete("/v1/tenants/acme/retention").status_code == 204
    assert api.get(f"/v1/runs/{run_id}/retention").json() is None

    assert api.put(f"/v1/runs/{run_id}/retention", json={"keep_last": 0}).status_code == 400
    assert api.put(f"/v1/runs/{run_id}/retention", json={"keep_lats": 1}).status_code == 400
    other = {"X-API-Key": keys.other_trainer}
    assert httpx.put(f"{server.url}/v1/runs/{run_id}/retention", json={"keep_last": 1}, headers=other).status_code == 404
    assert httpx.put(f"{server.url}/v1/tenants/acme/retention", json={"keep_last": 1}, headers=other).status_code == 404
    assert httpx.post(f"{server.url}{_url(paths[1])}/pin", headers=other).status_code == 404
    reader = {"X-API-Key": keys.reader}
    assert httpx.put(f"{server.url}/v1/runs/{run_id}/retention", json={"keep_last": 1}, headers=reader).status_code == 403
    assert httpx.post(f"{server.url}{_url(paths[1])}/pin", headers=reader).status_code == 403
    admin = {"X-API-Key": keys.admin}
    r = httpx.put(f"{server.url}/v1/tenants/acme/retention", json={"keep_every": 3}, headers=admin)
    assert r.status_code == 200 and r.json()["tenant_id"] == "acme"


def test_cli_round_trip_and_gc_dry_run_lists_the_policy_expiries(server, keys, ctx, clock):
    """issue 12, part 3: `retention set/show/clear`, `pin`/`unpin` and the collector's dry-run plan
    over the API naming each checkpoint a policy would expire and why; then a real run."""
    run_id, paths = _saved(ctx, clock, keys, 4)
    runner = CliRunner()
    auth = ["--url", server.url, "--api-key", keys.trainer]
    res = runner.invoke(app, ["retention", "set", "--run", run_id, "--keep-last", "2", *auth, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["keep_last"] == 2
    res = runner.invoke(app, ["retention", "show", "--run", run_id, *auth])
    assert res.exit_code == 0, res.output
    header, row = res.stdout.strip().splitlines()
    assert header.split()[:5] == ["SCOPE", "TENANT_ID", "RUN_ID", "KEEP_LAST", "KEEP_EVERY"]
    cells = row.split()
    assert cells[:2] + cells[3:5] == ["run", "acme", "2", "-"]  # the run id cell may be shortened
    res = runner.invoke(app, ["retention", "set", *auth])
    assert res.exit_code == 2 and "--run RUN" in res.output
    res = runner.invoke(app, ["pin", paths[0], *auth, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["pinned"] is True

    admin = ["--url", server.url, "--api-key", keys.admin]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as a:
        dry = a.post("/v1/admin/gc/runs", json={"phases": ["expire"], "dry_run": True}).json()
        planned = dry["plan"]["expire"]["policy_expire"]
        assert [(e["tinker_path"], e["policy"], e["rule"]) for e in planned] == [
            (paths[1], "run", "keep_last=2: 3rd newest sampler")
        ]
        assert a.get(_url(paths[1]), headers={"X-API-Key": keys.trainer}).status_code == 200  # nothing changed
    del admin

    res = runner.invoke(app, ["unpin", paths[0], *auth])
    assert res.exit_code == 0, res.output
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as a:
        real = a.post("/v1/admin/gc/runs", json={"phases": ["expire"], "dry_run": False}).json()
    assert sorted(e["tinker_path"] for e in real["plan"]["expire"]["policy_expire"]) == sorted(paths[:2])
    assert real["stats"]["expire"]["expired_by_policy"] == 2
    res = runner.invoke(app, ["retention", "clear", "--run", run_id, *auth])
    assert res.exit_code == 0 and "no retention policy" in res.output
    res = runner.invoke(app, ["retention", "show", *auth, "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    assert_verified(ctx)
