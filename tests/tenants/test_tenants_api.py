"""Tenants as a resource through the API and the CLI (issue 12, part 1): CRUD, disable/enable, delete
(checkpoints gone, billing exact, invoice still readable), keys for unknown tenants refused unless asked,
the operator tenant not billed."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest
from typer.testing import CliRunner

from tests.api.test_bad_input import assert_error, save
from tests.billing.ledger_builder import LedgerBuilder
from tests.helpers import sampler_files
from weightstore import auth, db
from weightstore.billing.overview import overview
from weightstore.billing.pricing import load_pricing
from weightstore_cli import app as cli_app

GB = 10**9


@pytest.fixture
def admin(server, keys):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as c:
        yield c


def _public(body: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in body.items() if k != "created_at"}


def test_crud_through_the_api(admin, api):  # type: ignore[no-untyped-def]
    """issue 12, part 1: create, list, show, change and clear a price override and quotas; names are
    validated, taken names refused, unknown tenants 404, non-admin keys 403."""
    r = admin.post("/v1/tenants", json={"name": "initech", "price_per_gb_month_usd": 0.05, "quota_bytes": 10 * GB})
    assert r.status_code == 201, r.text
    assert _public(r.json()) == {
        "tenant_id": "initech",
        "name": "initech",
        "state": "active",
        "operator": False,
        "price_per_gb_month_usd": 0.05,
        "quota_bytes": 10 * GB,
        "soft_quota_bytes": None,
        "used_bytes": 0,
        "stored_bytes": 0,
        "reserved_bytes": 0,
        "default_ttl_training_seconds": None,
        "default_ttl_sampler_seconds": None,
    }
    assert_error(admin.post("/v1/tenants", json={"name": "initech"}), 400, "already_exists")
    assert_error(admin.post("/v1/tenants", json={"name": "Bad Name"}), 400, "invalid_name")
    assert_error(admin.post("/v1/tenants", json={"name": "x", "quota_bytes": 5, "soft_quota_bytes": 6}), 400, "invalid_request")
    assert_error(admin.post("/v1/tenants", json={"name": "y", "price_per_gb_month_usd": -1}), 400, "invalid_request")
    assert [t["tenant_id"] for t in admin.get("/v1/tenants").json()["tenants"]] == ["acme", "globex", "initech", "ops"]
    r = admin.patch("/v1/tenants/initech", json={"name": "initrode", "soft_quota_bytes": 8 * GB, "price_per_gb_month_usd": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tenant_id"], body["name"], body["price_per_gb_month_usd"], body["soft_quota_bytes"], body["quota_bytes"]) == (
        "initech",
        "initrode",
        None,
        8 * GB,
        10 * GB,
    )
    assert admin.get("/v1/tenants/initrode").json()["tenant_id"] == "initech"  # by name or by id
    assert admin.patch("/v1/tenants/initech", json={"quota_bytes": None, "soft_quota_bytes": None}).json()["quota_bytes"] is None
    assert_error(admin.patch("/v1/tenants/acme", json={"name": "initrode"}), 400, "already_exists")
    assert_error(admin.get("/v1/tenants/nope"), 404, "not_found")
    assert_error(api.get("/v1/tenants"), 403, "forbidden")
    assert_error(api.post("/v1/tenants", json={"name": "mine"}), 403, "forbidden")


def test_disabled_tenant_keys_are_refused_until_enabled(admin, api, keys, server):  # type: ignore[no-untyped-def]
    """issue 12, part 1: a disabled tenant's keys answer 403 tenant_disabled; enable restores them.
    Tenants holding active admin keys (and the operator tenant) cannot be disabled."""
    assert api.get("/v1/runs").status_code == 200
    assert admin.post("/v1/tenants/acme/disable").json()["state"] == "disabled"
    r = api.get("/v1/runs")
    assert_error(r, 403, "tenant_disabled")
    assert r.json()["message"] == "tenant acme is disabled: its keys are refused until an admin enables it"
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}) as globex:
        assert globex.get("/v1/runs").status_code == 200  # other tenants unaffected
    assert admin.post("/v1/tenants/acme/enable").json()["state"] == "active"
    assert api.get("/v1/runs").status_code == 200
    r = admin.post("/v1/tenants/ops/disable")
    assert_error(r, 400, "invalid_request")
    assert r.json()["message"] == "tenant ops holds 1 active admin key(s): revoke them before it can be disabled"


def test_delete_ends_checkpoints_revokes_keys_and_keeps_the_invoice(admin, api, clock, ctx):  # type: ignore[no-untyped-def]
    """issue 12, part 1: delete → the tenant's checkpoints are gone at once (billed up to the delete,
    exactly), keys revoked, the tenant listed as deleted, its invoice still readable, the name kept."""
    run_id = api.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    files = sampler_files(3)
    assert save(api, run_id, files, name="a").status_code == 200
    size = sum(len(b) for b in files.values())
    clock.advance(3600)
    r = admin.delete("/v1/tenants/acme")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state"], body["checkpoints_deleted"], body["keys_revoked"], body["used_bytes"]) == ("deleted", 1, 2, 0)
    assert_error(api.get("/v1/runs"), 401, "unauthenticated")  # revoked
    month = clock.now().strftime("%Y-%m")
    inv = admin.get(f"/v1/billing/tenants/acme/invoices/{month}")
    assert inv.status_code == 200, inv.text
    clock.advance(86400)  # nothing accrues after the delete
    inv2 = admin.get(f"/v1/billing/tenants/acme/invoices/{month}").json()
    assert inv.json()["byte_seconds"] == inv2["byte_seconds"] == size * 3600
    with db.session_scope(ctx.engine) as s:
        from weightstore.models import Checkpoint

        assert [c.state for c in s.query(Checkpoint).filter_by(tenant_id="acme")] == ["deleted"]
    assert [t["state"] for t in admin.get("/v1/tenants").json()["tenants"] if t["tenant_id"] == "acme"] == ["deleted"]
    assert [t["tenant_id"] for t in admin.get("/v1/tenants", params={"include_deleted": False}).json()["tenants"]] == [
        "globex",
        "ops",
    ]
    assert_error(admin.post("/v1/tenants", json={"name": "acme"}), 400, "already_exists")
    assert_error(admin.post("/v1/keys", json={"tenant": "acme", "role": "trainer"}), 400, "invalid_request")
    assert admin.delete("/v1/tenants/acme").json()["checkpoints_deleted"] == 0  # idempotent


def test_keys_for_an_unknown_tenant_are_refused_unless_asked(admin, server, keys):  # type: ignore[no-untyped-def]
    """issue 12, part 1: `keys create --tenant acmee` (a typo) no longer creates a tenant."""
    r = admin.post("/v1/keys", json={"tenant": "acmee", "role": "trainer"})
    assert_error(r, 404, "not_found")
    assert r.json()["message"] == (
        "tenant 'acmee' does not exist: create it first (weightstore tenants create acmee) "
        "or pass --create-tenant (API: create_tenant: true)"
    )
    assert_error(admin.get("/v1/tenants/acmee"), 404, "not_found")
    assert admin.post("/v1/keys", json={"tenant": "acme", "role": "reader"}).status_code == 201  # existing: fine
    runner = CliRunner()
    base = ["--url", server.url, "--api-key", keys.admin]
    res = runner.invoke(cli_app, ["keys", "create", "--tenant", "hooli", *base])
    assert res.exit_code == 1
    assert "error [not_found]: tenant 'hooli' does not exist" in res.stderr
    res = runner.invoke(cli_app, ["keys", "create", "--tenant", "hooli", "--create-tenant", *base])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("tml-")
    assert admin.get("/v1/tenants/hooli").json()["state"] == "active"


def test_cli_crud_exact_output(server, keys, admin):  # type: ignore[no-untyped-def]
    """issue 12, part 1: the `weightstore tenants` commands, their data on stdout and messages on stderr."""
    runner = CliRunner()
    base = ["--url", server.url, "--api-key", keys.admin]
    res = runner.invoke(
        cli_app, ["tenants", "create", "initech", "--price-per-gb-month", "0.05", "--quota-bytes", "2GB", "-f", "json", *base]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert (row["tenant_id"], row["price_per_gb_month_usd"], row["quota_bytes"], row["soft_quota_bytes"]) == (
        "initech",
        0.05,
        2 * GB,
        None,
    )
    assert res.stderr == "created tenant initech\n"
    res = runner.invoke(cli_app, ["tenants", "set", "initech", "--quota-bytes", "none", "--soft-quota-bytes", "1000", *base])
    assert res.exit_code == 0, res.output
    assert res.stderr == "updated tenant initech: quota_bytes, soft_quota_bytes\n"
    res = runner.invoke(cli_app, ["tenants", "ls", "--bytes", "-f", "csv", *base])
    assert res.stdout.splitlines() == [
        "tenant_id,name,state,operator,price_per_gb_month_usd,used_bytes,soft_quota_bytes,quota_bytes",
        "acme,acme,active,False,-,0,-,-",
        "globex,globex,active,False,-,0,-,-",
        "initech,initech,active,False,0.05,0,1000,-",
        "ops,ops,active,False,-,0,-,-",
    ]
    res = runner.invoke(cli_app, ["tenants", "disable", "initech", *base])
    assert (res.exit_code, res.stderr) == (
        0,
        "disabled tenant initech: its keys are refused until `weightstore tenants enable initech`\n",
    )
    res = runner.invoke(cli_app, ["tenants", "enable", "initech", *base])
    assert (res.exit_code, res.stderr) == (0, "enabled tenant initech\n")
    res = runner.invoke(cli_app, ["tenants", "set", "initech", "--quota-bytes", "lots", *base])
    assert res.exit_code == 2
    assert res.stderr == "error: --quota-bytes 'lots': expected a number of bytes (e.g. 500000000000, 500GB, 2TiB) or 'none'\n"
    res = runner.invoke(cli_app, ["tenants", "delete", "initech", "-y", *base])
    assert res.exit_code == 0, res.output
    assert res.stderr == (
        "deleted tenant initech: 0 checkpoints deleted (bytes reclaimed by the collector), 0 keys revoked, "
        "0 uploads aborted, 0 exports cancelled; its invoices stay readable\n"
    )
    res = runner.invoke(cli_app, ["tenants", "delete", "nope", "-y", *base])
    assert res.exit_code == 1  # the CLI's error line (its suffix belongs to the CLI's error format)
    assert res.stderr.startswith("error [not_found]: tenant nope not found")


def test_operator_tenant_is_not_billed(ctx, clock):  # type: ignore[no-untyped-def]
    """issue 12, part 1: the bootstrap tenant is the operator tenant; the billing overview leaves it out."""
    now = clock.now()
    with db.session_scope(ctx.engine) as s:
        assert auth.bootstrap_admin(s, now=now) is not None
        auth.ensure_tenant(s, "acme", now=now)
    t0 = now - timedelta(days=2)
    lb = LedgerBuilder(ctx.engine)
    lb.commit("op1", t0, GB, tenant="admin", run="admin:r", kind="training")
    lb.commit("ac1", t0, 2 * GB, tenant="acme", run="acme:r", kind="training")
    with db.session_scope(ctx.engine) as s:
        from weightstore.models import Tenant

        assert s.get(Tenant, "admin").operator is True  # type: ignore[union-attr]
        ov = overview(s, load_pricing(s, ctx.settings), now=now, start=now - timedelta(days=7))
    assert [(r.key["tenant_id"], r.logical_bytes) for r in ov.current] == [("acme", 2 * GB)]
    assert {r.key["tenant_id"] for r in ov.daily} == {"acme"}
