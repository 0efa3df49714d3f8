"""Admin endpoints of the collector through a live server."""

from __future__ import annotations

from typing import get_args

import httpx
import pytest

from tests.collector._util import assert_verified, delete, download, new_run, object_exists, principal, save
from tests.helpers import sampler_files


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_gc_endpoints(server, keys, ctx, clock, db_url):
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(90)
    path = save(ctx, p, run_id, "x", files, ttl=3600)
    with (
        httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin,
        httpx.Client(base_url=server.url, headers={"X-API-Key": keys.trainer}, timeout=60) as trainer,
    ):
        assert trainer.get("/v1/admin/gc/runs").status_code == 403
        clock.advance(3601)
        r = admin.post("/v1/admin/gc/runs", json={"dry_run": True})
        assert r.status_code == 201 and r.json()["plan"]["expire"]["expire_checkpoints"] == 1
        r = admin.post("/v1/admin/gc/runs", json={})
        assert r.json()["state"] == "finished" and r.json()["stats"]["expire"]["expired"] == 1
        runs = admin.get("/v1/admin/gc/runs").json()["runs"]
        assert [x["dry_run"] for x in runs][:2] in ([False, True], [True, False])
        assert admin.get(f"/v1/admin/gc/runs/{r.json()['id']}").json()["id"] == r.json()["id"]
        assert admin.get("/v1/admin/gc/runs/nope").status_code == 404
        from weightstore.db import session_scope
        from weightstore.models import Checkpoint

        with session_scope(ctx.engine) as s:
            cid = s.query(Checkpoint).filter(Checkpoint.name == "x").one().id  # type: ignore[attr-defined]
        r = admin.post(f"/v1/admin/checkpoints/{cid}/restore", json={"ttl_seconds": 7200})
        assert r.status_code == 200, r.text
        assert r.json()["tinker_path"] == path
        assert download(ctx, p, path) == files  # visible again
        r = admin.put("/v1/admin/tenants/acme/default-ttl", json={"sampler_seconds": 7200})
        assert r.json() == {"tenant": "acme", "training_seconds": None, "sampler_seconds": 7200}
        assert "weightstore_gc_runs_total" in admin.get("/metrics").text
    delete(ctx, p, path)
    assert object_exists(ctx, files["adapter_model.safetensors"])
    assert_verified(ctx)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_app_without_collector_refuses_to_trigger_runs(ctx, keys, db_url):
    """The API never imports the collector: built without one, a trigger is a 400 ``unsupported``
    (nothing runs, nothing is recorded) while the catalog-only admin endpoints still work."""
    from fastapi.testclient import TestClient

    from weightstore_api.app import create_app

    with TestClient(create_app(ctx), headers={"X-API-Key": keys.admin}) as admin:
        r = admin.post("/v1/admin/gc/runs", json={"dry_run": True})
        assert (r.status_code, r.json()["code"]) == (400, "unsupported")
        assert admin.get("/v1/admin/gc/runs").json() == {"runs": []}
        r = admin.put("/v1/admin/tenants/acme/default-ttl", json={"training_seconds": 10})
        assert (r.status_code, r.json()["code"]) == (400, "invalid_ttl")  # the one TTL check


def test_the_api_phase_schema_is_the_collectors_phase_list():
    from weightstore.collector import PHASES
    from weightstore_api.schemas import Phase

    assert get_args(Phase) == PHASES
