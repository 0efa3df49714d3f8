"""``tinker billing usage`` through the real SDK and CLI (issue 12, part 7: the route answered 404),
and the invoice API's number, provisional label and checkpoint-level CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from tests.billing.ledger_builder import LedgerBuilder
from weightstore.db import session_scope
from weightstore.models import TrainingRun

pytestmark = pytest.mark.timeout(300)
TINKER = str(Path(sys.executable).with_name("tinker"))
GB = 10**9
Z = "%Y-%m-%dT%H:%M:%SZ"


@pytest.fixture
def hours(ctx, keys, clock):  # type: ignore[no-untyped-def]
    """acme: a 2 GB training checkpoint of run-q (Qwen/Qwen3-8B) from t0, a 1 GB sampler checkpoint of
    run-l (meta-llama/Llama-3.2-1B) from t0 + 1 h; globex: 5 GB from t0. t0 = 3 whole hours before now."""
    t0 = clock.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    with session_scope(ctx.engine) as s:
        for run, tenant, base in (
            ("run-q", "acme", "Qwen/Qwen3-8B"),
            ("run-l", "acme", "meta-llama/Llama-3.2-1B"),
            ("g", "globex", "Qwen/Qwen3-8B"),
        ):
            s.add(TrainingRun(id=run, tenant_id=tenant, base_model=base, created_at=t0, last_request_time=t0))
    lb = LedgerBuilder(ctx.engine)
    lb.commit("q1", t0, 2 * GB, tenant="acme", run="run-q", kind="training")
    lb.commit("l1", t0 + timedelta(hours=1), GB, tenant="acme", run="run-l", kind="sampler")
    lb.commit("g1", t0, 5 * GB, tenant="globex", run="g", kind="training")
    return t0


def test_sdk_billing_usage_events(server, keys, hours):
    import tinker

    t0 = hours
    admin = tinker.AdminClient(base_url=server.url, api_key=keys.trainer)
    resp = admin.get_billing_usage(t0.strftime(Z), (t0 + timedelta(hours=2)).strftime(Z)).result()
    got = [
        (
            e.bucket_start,
            e.project_id,
            e.base_model,
            e.event_info.type,
            getattr(e.event_info, "gigabyte_hours", None),
            getattr(e.event_info, "count", None),
        )
        for e in resp.data
    ]
    h1 = t0 + timedelta(hours=1)
    assert got == [
        (t0, "acme", "Qwen/Qwen3-8B", "storage", 2.0, None),
        (t0, "acme", "Qwen/Qwen3-8B", "checkpoint", None, 1),
        (h1, "acme", "Qwen/Qwen3-8B", "storage", 2.0, None),
        (h1, "acme", "meta-llama/Llama-3.2-1B", "storage", 1.0, None),
        (h1, "acme", "meta-llama/Llama-3.2-1B", "checkpoint", None, 1),
    ]  # only the caller's tenant: globex is not shown
    storage = resp.data[0]
    assert storage.effective_rate_usd_per_gigabyte_month == pytest.approx(0.10)
    assert storage.estimated_cost_usd == pytest.approx(0.10 * 2.0 / 720)
    assert resp.data[1].estimated_cost_usd is None and resp.sessions == {}


def run_cli(server, key: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0", "HOME": str(tmp_path)}
    return subprocess.run([TINKER, *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_billing_usage(server, keys, hours, tmp_path):
    t0 = hours
    window = (t0.strftime(Z), (t0 + timedelta(hours=1)).strftime(Z))
    proc = run_cli(server, keys.admin, "-f", "json", "billing", "usage", *window, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    rows = [(d["project_id"], d["base_model"], d["event_info"]) for d in out["data"]]
    assert rows == [
        ("acme", "Qwen/Qwen3-8B", {"type": "storage", "free": False, "gigabyte_hours": 2.0}),
        ("globex", "Qwen/Qwen3-8B", {"type": "storage", "free": False, "gigabyte_hours": 5.0}),
        ("acme", "Qwen/Qwen3-8B", {"type": "checkpoint", "count": 1}),
        ("globex", "Qwen/Qwen3-8B", {"type": "checkpoint", "count": 1}),
    ]  # an admin key sees every tenant
    csv_out = run_cli(server, keys.admin, "billing", "usage", *window, "--csv", "-", tmp_path=tmp_path)
    assert csv_out.returncode == 0, csv_out.stderr
    table = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert [(r["project_id"], r["type"], r["gigabyte_hours"], r["count"]) for r in table] == [
        ("acme", "storage", "2.0", ""),
        ("globex", "storage", "5.0", ""),
        ("acme", "checkpoint", "", "1"),
        ("globex", "checkpoint", "", "1"),
    ]
    # the Tinker window rules: not hour-aligned, more than 14 days, in the future -> one line, exit != 0
    bad = run_cli(server, keys.admin, "billing", "usage", t0.strftime("%Y-%m-%dT%H:30:00Z"), window[1], tmp_path=tmp_path)
    assert bad.returncode != 0 and "hour boundary" in bad.stderr + bad.stdout


def test_event_window_refusals(server, keys, hours, clock):
    t0 = hours

    def ask(start, end):  # type: ignore[no-untyped-def]
        return httpx.get(
            server.url + "/api/v1/billing/usage/events",
            params={"starting_on": start.strftime(Z), "ending_before": end.strftime(Z)},
            headers={"X-API-Key": keys.admin},
            timeout=30,
        )

    assert ask(t0, t0 + timedelta(days=14)).status_code == 200  # 14 days exactly; the end is cut at now
    for start, end, words in (
        (t0, t0 + timedelta(days=14, hours=1), "at most 14 days"),
        (t0 + timedelta(minutes=30), t0 + timedelta(hours=2), "hour boundary"),
        (t0, t0, "after starting_on"),
        (t0 + timedelta(hours=5), t0 + timedelta(hours=6), "future"),
    ):
        r = ask(start, end)
        assert r.status_code == 400 and words in r.json()["message"], r.text


def test_invoice_api_number_provisional_and_checkpoint_csv(server, keys, hours, clock):
    month = clock.now().strftime("%Y-%m")
    t0 = hours
    if t0.strftime("%Y-%m") != month:
        pytest.skip("the seeded hours straddle a month boundary")
    url = f"{server.url}/v1/billing/tenants/acme/invoices/{month}"
    inv = httpx.get(url, headers={"X-API-Key": keys.trainer}, timeout=30).json()
    assert inv["number"] == f"WS-acme-{month.replace('-', '')}" and inv["status"] == "provisional" and inv["provisional"] is True
    assert [(x["run_id"], x["base_model"], x["kind"], x["checkpoint_count"]) for x in inv["lines"]] == [
        ("run-l", "meta-llama/Llama-3.2-1B", "sampler", 1),
        ("run-q", "Qwen/Qwen3-8B", "training", 1),
    ]
    text = httpx.get(url + "/checkpoints.csv", headers={"X-API-Key": keys.trainer}, timeout=30)
    assert text.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text.text)))
    now_s = int(clock.now().timestamp())
    assert [(r["checkpoint_id"], r["base_model"], r["size_bytes"], r["byte_seconds"]) for r in rows] == [
        ("l1", "meta-llama/Llama-3.2-1B", str(GB), str(GB * (now_s - int(t0.timestamp()) - 3600))),
        ("q1", "Qwen/Qwen3-8B", str(2 * GB), str(2 * GB * (now_s - int(t0.timestamp())))),
    ]
    same = httpx.get(url, params={"detail": "checkpoint", "format": "csv"}, headers={"X-API-Key": keys.trainer}, timeout=30)
    assert same.text == text.text
    assert (
        httpx.get(url.replace("acme", "globex") + "/checkpoints.csv", headers={"X-API-Key": keys.trainer}, timeout=30).status_code
        == 404
    )
