"""Billing API and CLI against a live server: scoping (own tenant / admin / foreign = 404), shapes, CSV."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import httpx
import pytest
from typer.testing import CliRunner

from tests.billing.ledger_builder import LedgerBuilder
from weightstore_cli import app as cli_app

GB = 10**9


@pytest.fixture
def seeded(ctx, keys, clock):  # type: ignore[no-untyped-def]
    t0 = clock.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=72)
    lb = LedgerBuilder(ctx.engine)
    lb.commit("a1", t0, GB, tenant="acme", run="r1", kind="training")
    lb.end("a1", t0 + timedelta(hours=72), GB, tenant="acme", run="r1", kind="training")
    lb.commit("a2", t0, 2 * GB, tenant="acme", run="r2", kind="sampler")
    lb.commit("g1", t0, 5 * GB, tenant="globex", run="g", kind="training")
    return t0


def get(server, key, path, **params):  # type: ignore[no-untyped-def]
    return httpx.get(server.url + path, headers={"X-API-Key": key}, params=params, timeout=30)


def test_scoping_and_tinker_shape(server, keys, seeded):
    # a tenant reads its own usage; another tenant's is 404 (same as a tenant that does not exist)
    own = get(server, keys.reader, "/v1/billing/current").json()
    assert [(r["tenant_id"], r["checkpoint_count"], r["logical_bytes"]) for r in own["rows"]] == [("acme", 1, 2 * GB)]
    assert own["total_projected_monthly_cost_usd"] == "0.20"
    foreign = get(server, keys.reader, "/v1/billing/current", tenant="globex")
    missing = get(server, keys.reader, "/v1/billing/current", tenant="nope")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["code"] == missing.json()["code"] == "not_found"
    assert get(server, keys.trainer, "/v1/billing/tenants/globex/invoices/2026-01").status_code == 404
    # admins read everything
    allrows = get(server, keys.admin, "/v1/billing/current").json()["rows"]
    assert {r["tenant_id"]: r["logical_bytes"] for r in allrows} == {"acme": 2 * GB, "globex": 5 * GB}
    tinker = get(server, keys.admin, "/api/v1/billing/usage/checkpoints/current").json()
    assert tinker["effective_rate_usd_per_gigabyte_month"] == pytest.approx(0.10)
    items = {d["project_id"]: d for d in tinker["data"]}
    assert items["globex"]["checkpoint_count"] == 1 and items["globex"]["size_bytes"] == 5 * GB
    assert items["globex"]["size_gigabytes"] == 5.0 and items["globex"]["estimated_monthly_cost_usd"] == 0.5
    mine = get(server, keys.trainer, "/api/v1/billing/usage/checkpoints/current").json()
    assert [d["project_id"] for d in mine["data"]] == ["acme"]
    assert get(server, "tml-wrong", "/api/v1/billing/usage/checkpoints/current").status_code == 401


def test_usage_window_invoice_and_csv(server, keys, seeded, clock):
    t0 = seeded
    now = clock.now()
    r = get(
        server,
        keys.trainer,
        "/v1/billing/usage",
        since=t0.isoformat(),
        until=(t0 + timedelta(hours=72)).isoformat(),
        group_by="run_id",
        bucket="none",
    ).json()
    assert {x["run_id"]: x["byte_seconds"] for x in r["rows"]} == {"r1": GB * 72 * 3600, "r2": 2 * GB * 72 * 3600}
    assert {x["run_id"]: x["cost_usd"] for x in r["rows"]} == {"r1": "0.01", "r2": "0.02"}
    assert r["total_cost_usd"] == "0.03"
    daily = get(server, keys.trainer, "/v1/billing/usage", since=t0.isoformat(), until=now.isoformat(), bucket="day").json()
    assert sum(x["byte_seconds"] for x in daily["rows"]) == GB * 72 * 3600 + 2 * GB * int((now - t0).total_seconds())
    csv_text = get(
        server, keys.trainer, "/v1/billing/usage", since=t0.isoformat(), until=now.isoformat(), bucket="day", format="csv"
    )
    assert csv_text.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(csv_text.text)))
    assert sum(int(x["byte_seconds"]) for x in rows) == sum(x["byte_seconds"] for x in daily["rows"])
    month = f"{t0.year:04d}-{t0.month:02d}"
    inv = get(server, keys.admin, f"/v1/billing/tenants/acme/invoices/{month}").json()
    assert inv["tenant_id"] == "acme" and {ln["run_id"] for ln in inv["lines"]} <= {"r1", "r2"}
    assert inv["total_usd"] == str(sum(__import__("decimal").Decimal(ln["amount_usd"]) for ln in inv["lines"]))
    bad = get(server, keys.admin, "/v1/billing/tenants/acme/invoices/2026-13")
    assert bad.status_code == 400


def test_cli_usage_and_invoice(server, keys, seeded, monkeypatch):
    t0 = seeded
    monkeypatch.setenv("WEIGHTSTORE_URL", server.url)
    monkeypatch.setenv("WEIGHTSTORE_API_KEY", keys.admin)
    runner = CliRunner()
    res = runner.invoke(
        cli_app,
        ["billing", "usage", "--since", t0.isoformat(), "--until", (t0 + timedelta(hours=72)).isoformat(), "--format", "json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {r["tenant_id"]: r["cost_usd"] for r in out["rows"]} == {"acme": "0.03", "globex": "0.05"}
    res = runner.invoke(
        cli_app,
        [
            "billing",
            "usage",
            "--tenant",
            "acme",
            "--group-by",
            "kind",
            "--since",
            t0.isoformat(),
            "--until",
            (t0 + timedelta(hours=72)).isoformat(),
            "--format",
            "csv",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert {r["kind"]: r["cost_usd"] for r in rows} == {"training": "0.01", "sampler": "0.02"}
    month = f"{t0.year:04d}-{t0.month:02d}"
    res = runner.invoke(cli_app, ["billing", "invoice", "--tenant", "globex", "--month", month, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tenant_id"] == "globex"
    monkeypatch.setenv("WEIGHTSTORE_API_KEY", keys.trainer)
    res = runner.invoke(cli_app, ["billing", "invoice", "--tenant", "globex", "--month", month])
    assert res.exit_code == 1 and "not_found" in res.output
