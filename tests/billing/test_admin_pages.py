"""Admin UI pages without a browser (issue 12, part 7): HTML error pages, sizes and axes that read
true at any scale, and the invoice page's number, provisional label, base model and counts."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.api.test_limits import admin_client
from tests.billing.ledger_builder import LedgerBuilder
from weightstore.db import session_scope
from weightstore.models import Tenant, TrainingRun
from weightstore_api.routers.admin import daily_chart, human_bytes

GB = 10**9


def test_human_bytes_chooses_the_unit_per_scale():
    assert [human_bytes(n) for n in (0, 999, 1000, 999_600, 2 * 10**8, 84 * GB, 1.6 * GB, 12 * 10**12, 3 * 10**18)] == [
        "0 B",
        "999 B",
        "1 kB",
        "1 MB",
        "200 MB",
        "84 GB",
        "1.6 GB",
        "12 TB",
        "3,000 PB",
    ]


def test_chart_axes_of_a_small_tenant_read_true():
    points = [{"bucket": "2026-01-01", "cost_usd": "0.0007", "average_gb": 0.2, "gb_hours": 4.8}]
    svg = str(daily_chart(points))
    assert 'id="axis-gb-max">200 MB<' in svg and "0.00 GB" not in svg
    assert ">$0.0007<" in svg  # not "$0.00"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_unknown_tenant_and_bad_month_are_html_pages(server, keys):
    with admin_client(server, keys) as ui:
        r = ui.get("/admin/tenants/nope")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert '<p class="error" id="error">tenant nope not found</p>' in r.text
        r = ui.get("/admin/tenants/nope/invoices/2026-01")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        r = ui.get("/admin/tenants/acme/invoices/2026-13")
        assert r.status_code == 400 and "month must be YYYY-MM" in r.text and r.headers["content-type"].startswith("text/html")
        r = ui.get("/admin/tenants/acme", params={"since": "2026-02-30"})
        assert r.status_code == 400 and "not a date" in r.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_invoice_page_number_label_base_model_and_counts(server, keys, ctx, clock):
    now = clock.now()
    t0 = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    with session_scope(ctx.engine) as s:
        assert s.get(Tenant, "acme") is not None
        s.add(TrainingRun(id="acme:r", tenant_id="acme", base_model="Qwen/Qwen3-8B", created_at=t0, last_request_time=t0))
    lb = LedgerBuilder(ctx.engine)
    lb.commit("k1", t0, GB, tenant="acme", run="acme:r", kind="training")
    lb.commit("k2", t0, GB, tenant="acme", run="acme:r", kind="training")
    prev = (t0 - timedelta(days=1)).strftime("%Y-%m")
    month = now.strftime("%Y-%m")
    with admin_client(server, keys) as ui:
        page = ui.get(f"/admin/tenants/acme/invoices/{month}").text
        assert f'<span id="invoice-number">WS-acme-{month.replace("-", "")}</span>' in page
        assert 'id="invoice-status">Provisional · to date<' in page
        assert '<td class="base-model">Qwen/Qwen3-8B</td>' in page and '<td class="num count">2</td>' in page
        closed = ui.get(f"/admin/tenants/acme/invoices/{prev}").text
        assert 'id="invoice-status">Final<' in closed and f"WS-acme-{prev.replace('-', '')}" in closed
        csv_text = ui.get(f"/admin/tenants/acme/invoices/{month}/checkpoints.csv").text
        assert [line.split(",")[3] for line in csv_text.splitlines()[1:]] == ["k1", "k2"]
