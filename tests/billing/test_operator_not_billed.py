"""The operator tenant is not billed on any route (issue 12, part 1): every all-tenant billing answer
(current usage and its projection, usage windows in JSON and CSV, physical bytes, the Tinker current
usage and usage events) leaves it out, from one rule (``weightstore.billing.billable``); asked for by
name it still shows its usage, at $0, marked not billed. Exact numbers throughout."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import httpx
import pytest

from tests.billing.ledger_builder import LedgerBuilder
from weightstore import auth
from weightstore.billing.units import month_window
from weightstore.db import session_scope
from weightstore.models import Tenant

GB = 10**9
H72 = 72 * 3600


@pytest.fixture
def seeded(ctx, keys, clock):  # type: ignore[no-untyped-def]
    """acme: 1 GB training for 72 h + 2 GB sampler (open); globex: 5 GB training (open); the operator
    tenant ``ops`` (the admin key's): 7 GB training (open). All from ``t0`` = 72 h ago (hour-aligned)."""
    t0 = clock.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=72)
    with session_scope(ctx.engine) as s:
        ops = s.get(Tenant, "ops")
        assert ops is not None
        ops.operator = True
        s.add(ops)
        ops_reader = auth.create_key(s, tenant="ops", role="reader", now=clock.now())[1]
    lb = LedgerBuilder(ctx.engine)
    lb.commit("a1", t0, GB, tenant="acme", run="r1", kind="training")
    lb.end("a1", t0 + timedelta(hours=72), GB, tenant="acme", run="r1", kind="training")
    lb.commit("a2", t0, 2 * GB, tenant="acme", run="r2", kind="sampler")
    lb.commit("g1", t0, 5 * GB, tenant="globex", run="g", kind="training")
    lb.commit("o1", t0, 7 * GB, tenant="ops", run="o", kind="training")
    return t0, ops_reader


def get(server, key, path, **params):  # type: ignore[no-untyped-def]
    r = httpx.get(server.url + path, headers={"X-API-Key": key}, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r


def test_current_usage_and_projection_leave_the_operator_out(server, keys, seeded):
    """issue 12, part 1: ``GET /v1/billing/current`` for all tenants, by tenant and by kind."""
    cur = get(server, keys.admin, "/v1/billing/current").json()
    assert [(r["tenant_id"], r["checkpoint_count"], r["logical_bytes"]) for r in cur["rows"]] == [
        ("globex", 1, 5 * GB),
        ("acme", 1, 2 * GB),
    ]
    assert cur["total_logical_bytes"] == 7 * GB
    assert cur["total_projected_monthly_cost_usd"] == "0.70"  # 7 GB x $0.10; the operator's 7 GB not counted
    assert cur["not_billed_tenants"] == ["ops"]
    by_kind = get(server, keys.admin, "/v1/billing/current", group_by="kind").json()
    assert {r["kind"]: r["logical_bytes"] for r in by_kind["rows"]} == {"training": 5 * GB, "sampler": 2 * GB}
    # asked for by name: its usage shows, at $0, marked not billed
    own = get(server, keys.admin, "/v1/billing/current", tenant="ops").json()
    assert [(r["tenant_id"], r["logical_bytes"], r["projected_monthly_cost_usd"]) for r in own["rows"]] == [
        ("ops", 7 * GB, "0.00")
    ]
    assert own["total_projected_monthly_cost_usd"] == "0.00" and own["not_billed_tenants"] == ["ops"]
    assert get(server, keys.admin, "/v1/billing/current", tenant="acme").json()["not_billed_tenants"] == []


def test_usage_window_and_csv_leave_the_operator_out(server, keys, seeded):
    """issue 12, part 1: ``GET /v1/billing/usage`` without a tenant filter, every grouping, JSON and CSV."""
    t0, _ = seeded
    window = {"since": t0.isoformat(), "until": (t0 + timedelta(hours=72)).isoformat(), "bucket": "none"}
    by_tenant = get(server, keys.admin, "/v1/billing/usage", **window).json()
    assert {r["tenant_id"]: r["byte_seconds"] for r in by_tenant["rows"]} == {"acme": 3 * GB * H72, "globex": 5 * GB * H72}
    assert by_tenant["total_byte_seconds"] == 8 * GB * H72
    assert {r["tenant_id"]: r["cost_usd"] for r in by_tenant["rows"]} == {"acme": "0.03", "globex": "0.05"}
    assert by_tenant["total_cost_usd"] == "0.08" and by_tenant["not_billed_tenants"] == ["ops"]
    by_kind = get(server, keys.admin, "/v1/billing/usage", group_by="kind", **window).json()
    assert {r["kind"]: r["byte_seconds"] for r in by_kind["rows"]} == {"training": 6 * GB * H72, "sampler": 2 * GB * H72}
    daily = get(server, keys.admin, "/v1/billing/usage", since=window["since"], until=window["until"], bucket="day").json()
    assert {r["tenant_id"] for r in daily["rows"]} == {"acme", "globex"}
    assert daily["total_byte_seconds"] == 8 * GB * H72
    text = get(server, keys.admin, "/v1/billing/usage", group_by="tenant_id,run_id", format="csv", **window).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sorted((r["tenant_id"], r["run_id"], int(r["byte_seconds"])) for r in rows) == [
        ("acme", "r1", GB * H72),
        ("acme", "r2", 2 * GB * H72),
        ("globex", "g", 5 * GB * H72),
    ]
    own = get(server, keys.admin, "/v1/billing/usage", tenant="ops", **window).json()
    assert [(r["tenant_id"], r["byte_seconds"], r["cost_usd"]) for r in own["rows"]] == [("ops", 7 * GB * H72, "0.00")]
    assert own["total_cost_usd"] == "0.00"


def test_tinker_current_usage_and_events_leave_the_operator_out(server, keys, seeded):
    """issue 12, part 1: the Tinker current-usage route and the usage events (all tenants for an admin
    key); the operator's own key sees its usage at $0, its storage events ``free``."""
    t0, ops_reader = seeded
    cur = get(server, keys.admin, "/api/v1/billing/usage/checkpoints/current").json()
    assert sorted((d["project_id"], d["size_bytes"], d["estimated_monthly_cost_usd"]) for d in cur["data"]) == [
        ("acme", 2 * GB, 0.2),
        ("globex", 5 * GB, 0.5),
    ]
    assert cur["effective_rate_usd_per_gigabyte_month"] == pytest.approx(0.10)
    mine = get(server, ops_reader, "/api/v1/billing/usage/checkpoints/current").json()
    assert [(d["project_id"], d["size_bytes"], d["estimated_monthly_cost_usd"]) for d in mine["data"]] == [("ops", 7 * GB, 0.0)]
    assert mine["effective_rate_usd_per_gigabyte_month"] == 0.0
    window = {"starting_on": t0.isoformat(), "ending_before": (t0 + timedelta(hours=1)).isoformat()}
    events = get(server, keys.admin, "/api/v1/billing/usage/events", **window).json()["data"]
    storage = {(e["project_id"], e["event_info"]["gigabyte_hours"]) for e in events if e["event_info"]["type"] == "storage"}
    assert storage == {("acme", 3.0), ("globex", 5.0)}
    commits = {(e["project_id"], e["event_info"]["count"]) for e in events if e["event_info"]["type"] == "checkpoint"}
    assert commits == {("acme", 2), ("globex", 1)}
    own = get(server, ops_reader, "/api/v1/billing/usage/events", **window).json()["data"]
    assert [(e["project_id"], e["event_info"], e["estimated_cost_usd"]) for e in own if e["event_info"]["type"] == "storage"] == [
        ("ops", {"type": "storage", "free": True, "gigabyte_hours": 7.0}, 0.0)
    ]


def test_operator_invoice_is_zero_and_marked_not_billed(server, keys, seeded, clock):
    """issue 12, part 1: the operator's own invoice lists its usage at a zero rate, ``billed: false``."""
    month = clock.now().strftime("%Y-%m")
    start, _ = month_window(month)
    inv = get(server, keys.admin, f"/v1/billing/tenants/ops/invoices/{month}").json()
    assert inv["billed"] is False and inv["total_usd"] == "0.00"
    assert [(ln["run_id"], ln["rate_usd_per_gb_month"], ln["amount_usd"]) for ln in inv["lines"]] == [("o", "0", "0.00")]
    t0, _ = seeded
    stored_from = max(t0, start)
    assert inv["byte_seconds"] == 7 * GB * int((clock.now() - stored_from).total_seconds())
    acme = get(server, keys.admin, f"/v1/billing/tenants/acme/invoices/{month}").json()
    assert acme["billed"] is True
