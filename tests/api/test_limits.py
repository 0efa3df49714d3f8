"""Limits on what a request may carry: JSON depth/size/numbers in bodies and uploaded files, calendar
edges of every date/month parameter, ``user_metadata`` size, Tinker body strictness (issue 11).

Every bad input answers a 4xx with a stable ``code`` in the JSON error body, never a 5xx, and the
connection stays usable (the Tinker SDK retries 5xx and dropped connections for minutes).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.api.test_bad_input import assert_error, assert_nothing_stored, decl, save, with_weights
from tests.helpers import sampler_files, state_files

DEEP = 100_000


def deep_json(depth: int = DEEP) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def st_raw(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.fixture
def run_id(api: httpx.Client) -> str:
    r = api.post("/v1/runs", json={"base_model": "tiny", "lora_rank": 4})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


def assert_alive(api: httpx.Client) -> None:
    """The connection that carried the bad request still answers (it was not dropped)."""
    assert api.get("/v1/checkpoints").status_code == 200


# --- JSON inside uploaded files (issue 11, item 4) ------------------------------------------------
@pytest.mark.parametrize("where", ["safetensors-header", "adapter_config", "extra-json"])
def test_deeply_nested_json_in_uploaded_files_refused(api, run_id, where):
    """issue 11, item 4: depth 100k in a safetensors header, adapter_config.json or any *.json → 400 invalid_format."""
    if where == "safetensors-header":
        files = with_weights(st_raw(deep_json()))
    elif where == "adapter_config":
        files = {**sampler_files(), "adapter_config.json": deep_json()}
    else:
        files = {**sampler_files(), "extra/notes.json": deep_json()}
    r = save(api, run_id, files)
    assert_error(r, 400, "invalid_format")
    assert "nested deeper than" in r.json()["message"]
    assert_nothing_stored(api, run_id)
    assert_alive(api)


@pytest.mark.parametrize(
    "alpha", ["Infinity", "-Infinity", "NaN", "1e999", "-1e999"], ids=["inf", "-inf", "nan", "overflow", "-overflow"]
)
def test_non_finite_lora_alpha_refused(api, run_id, alpha):
    """issue 11, item 6: ``lora_alpha: Infinity`` (and every non-finite spelling) is refused, not stored."""
    files = {**sampler_files(), "adapter_config.json": f'{{"r": 4, "lora_alpha": {alpha}}}'.encode()}
    r = save(api, run_id, files)
    assert_error(r, 400, "invalid_format")
    assert_nothing_stored(api, run_id)


def test_non_finite_number_anywhere_in_uploaded_json_refused(api, run_id):
    """issue 11, item 6: the one JSON parser refuses non-finite numbers in every JSON file, not only known fields."""
    files = {**sampler_files(), "extra/stats.json": b'{"loss": NaN}'}
    assert_error(save(api, run_id, files), 400, "invalid_format")
    header = json.dumps({"__metadata__": {"a": "b"}}).encode()[:-1] + b', "x": Infinity}'
    assert_error(save(api, run_id, with_weights(st_raw(header))), 400, "invalid_format")
    assert_nothing_stored(api, run_id)


def test_huge_integer_literal_in_uploaded_json_refused(api, run_id):
    """issue 11, item 4: an integer literal past Python's digit limit is a ValueError, not JSONDecodeError (was a 500)."""
    files = {**sampler_files(), "adapter_config.json": b'{"r": ' + b"7" * 5000 + b', "lora_alpha": 8}'}
    assert_error(save(api, run_id, files), 400, "invalid_format")
    assert_alive(api)


# --- JSON request bodies (issue 11, item 4) -------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/runs", b'{"base_model": "tiny", "user_metadata": ' + deep_json() + b"}"),
        ("/v1/runs", deep_json()),
        ("/api/v1/create_session", b'{"tags": [], "user_metadata": {"k": ' + deep_json(5_000) + b"}}"),
        ("/api/v1/create_session", b'{"tags": [], "user_metadata": {"k": NaN}}'),
        ("/v1/runs", b'{"base_model": "tiny", "lora_rank": 1e999}'),
        ("/v1/runs", b'{"base_model": "tiny", "lora_rank": ' + b"9" * 5000 + b"}"),
    ],
    ids=["deep-field", "deep-root", "tinker-deep-metadata", "tinker-nan-metadata", "overflow-float", "huge-int"],
)
def test_bad_json_request_bodies_refused(api, path, body):
    """issue 11, item 4: one depth/number rule for every JSON request body → 400 invalid_request, connection kept."""
    r = api.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_request")
    assert_alive(api)


def test_oversized_json_body_refused(api, ctx):
    """issue 11, item 5: a JSON body over ``max_json_body_bytes`` → 413 too_large before it is parsed."""
    big = {"base_model": "tiny", "user_metadata": {"k": "x" * (ctx.settings.max_json_body_bytes + 1)}}
    r = api.post("/v1/runs", json=big)
    assert_error(r, 413, "too_large")
    assert_alive(api)


def test_file_stream_with_json_content_type_is_not_a_json_body(api, run_id):
    """The limit applies to JSON documents the routes parse, not to file bytes streamed through the service."""
    files = sampler_files()
    up = api.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "ct", "files": decl(files)}).json()
    for f in up["files"]:
        put = api.put(f["url"], content=files[f["path"]], headers={"Content-Type": "application/json"})
        assert put.status_code == 200, put.text
    assert api.post(f"/v1/uploads/{up['upload_id']}/commit").status_code == 200


# --- user_metadata (issue 11, item 5) -------------------------------------------------------------
TOO_BIG_METADATA = [{"k": "v" * 20_000}, {f"k{i}": "v" for i in range(100)}, {"k" * 1000: "v"}]


@pytest.mark.parametrize("meta", TOO_BIG_METADATA, ids=["long-value", "many-keys", "long-key"])
def test_user_metadata_bounded_on_every_route(api, run_id, meta):
    """issue 11, item 5: run, upload and Tinker session/load user_metadata share one bound → 400 invalid_request."""
    assert_error(api.post("/v1/runs", json={"base_model": "tiny", "user_metadata": meta}), 400, "invalid_request")
    r = save(api, run_id, sampler_files(), user_metadata=meta)
    assert_error(r, 400, "invalid_request")
    assert_error(api.post("/api/v1/create_session", json={"tags": [], "user_metadata": meta}), 400, "invalid_request")
    sid = api.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
    assert save(api, run_id, state_files(), name="src", kind="training").status_code == 200
    load = {"session_id": sid, "model_seq_id": 1, "path": f"tinker://{run_id}/weights/src", "user_metadata": meta}
    assert_error(api.post("/api/v1/load_weights", json=load), 400, "invalid_request")
    assert api.get("/v1/runs").json()["total_count"] == 1  # only the fixture's run exists


def test_user_metadata_within_bounds_accepted(api):
    meta = {f"k{i}": "v" * 100 for i in range(64)}
    r = api.post("/v1/runs", json={"base_model": "tiny", "user_metadata": meta})
    assert r.status_code == 201, r.text
    assert r.json()["user_metadata"] == meta


# --- Tinker body strictness (issue 11, item 6) ----------------------------------------------------
@pytest.mark.parametrize("ttl", ["7200", 7200.0, True], ids=["string", "float", "bool"])
def test_tinker_ttl_route_as_strict_as_native(api, run_id, ttl):
    """issue 11, item 6: ``PUT .../ttl {"ttl_seconds": "7200"}`` was coerced on the Tinker route; native refused it."""
    assert save(api, run_id, sampler_files()).status_code == 200
    native = api.put(f"/v1/checkpoints/{run_id}/sampler_weights/ck/ttl", json={"ttl_seconds": ttl})
    tinker = api.put(f"/api/v1/training_runs/{run_id}/checkpoints/sampler_weights/ck/ttl", json={"ttl_seconds": ttl})
    assert_error(native, 400, "invalid_request")
    assert_error(tinker, 400, "invalid_request")
    ck = api.get(f"/v1/checkpoints/{run_id}/sampler_weights/ck").json()
    assert ck["expires_at"] is None  # nothing changed
    ok = api.put(f"/api/v1/training_runs/{run_id}/checkpoints/sampler_weights/ck/ttl", json={"ttl_seconds": 7200})
    assert ok.status_code == 200, ok.text


# --- dates and months at the calendar's edges (issue 11, item 4) ----------------------------------
USAGE_EDGES: list[dict[str, str]] = [
    {"until": "0001-01-02"},
    {"until": "0001-01-01T00:00:00"},
    {"since": "0001-01-01"},
    {"since": "0001-01-01", "until": "0001-01-02"},
    {"since": "0001-01-01T00:00:00+01:00"},
    {"until": "0001-01-01T00:00:00+01:00"},
    {"until": "9999-12-31T23:59:59"},
    {"until": "9999-12-31T23:59:59-01:00"},
    {"since": "9999-12-31T23:59:59"},
    {"since": "9999-12-31", "until": "0001-01-01"},
    {"since": "1969-12-31T23:59:59", "until": "1970-01-02"},
    {"since": "2026-01-02", "until": "2026-01-01"},
    {"until": "1970-01-01T00:00:00"},
]
MONTH_EDGES = [
    "9999-12",
    "9999-11",
    "0000-01",
    "0001-01",
    "1969-12",
    "1970-01",
    "2026-13",
    "2026-00",
    "+2026-01",
    "2_026-01",
    "x",
]


@contextmanager
def admin_client(server, keys) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    """An httpx client signed in to the admin UI (same-origin POST with the form's CSRF token)."""
    with httpx.Client(base_url=server.url, timeout=60, headers={"Origin": server.url}) as client:
        form = client.get("/admin/login").text
        token = re.search(r'name="csrf_token" value="([^"]*)"', form)
        r = client.post("/admin/login", data={"api_key": keys.admin, "csrf_token": token.group(1) if token else ""})
        assert r.status_code == 303, r.text
        yield client


@pytest.mark.parametrize("params", USAGE_EDGES, ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in USAGE_EDGES])
def test_usage_window_edges_never_5xx(server, keys, params):
    """issue 11, item 4: every billing window at the calendar's edges answers 200 or 400 invalid_request."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        for bucket in ("day", "hour", "none"):
            r = admin.get("/v1/billing/usage", params={**params, "bucket": bucket})
            assert r.status_code in (200, 400), (bucket, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["code"] == "invalid_request"


def test_usage_window_clamps_and_refusals(server, keys, clock):
    """The window rule (issue 11, item 4): ``until`` in the future is cut at now; ``since`` before 1970 at 1970;
    a window that ends before it starts (after clamping) is refused."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        future = admin.get("/v1/billing/usage", params={"until": "9999-12-31T23:59:59", "bucket": "none"})
        assert future.status_code == 200, future.text
        assert future.json()["end"].startswith(clock.now().isoformat()[:19])
        early = admin.get("/v1/billing/usage", params={"since": "1969-12-31T00:00:00", "until": "1970-01-02", "bucket": "none"})
        assert early.status_code == 200, early.text
        assert early.json()["start"].startswith("1970-01-01T00:00:00")
        assert_error(admin.get("/v1/billing/usage", params={"until": "0001-01-02"}), 400, "invalid_request")


@pytest.mark.parametrize("month", MONTH_EDGES)
def test_invoice_month_edges_never_5xx(server, keys, month):
    """issue 11, item 4: invoice months at the calendar's edges → 200 (empty) or 400 invalid_request, on the
    native JSON and CSV routes and the admin invoice page and CSV."""
    expected = 200 if month in ("1970-01", "9999-11") else 400
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as api_admin:
        for fmt in ("json", "csv"):
            r = api_admin.get(f"/v1/billing/tenants/acme/invoices/{month}", params={"format": fmt})
            assert r.status_code == expected, (fmt, r.text)
            if expected == 400:
                assert r.json()["code"] == "invalid_request"
    with admin_client(server, keys) as ui:
        for suffix in ("", "/csv"):
            r = ui.get(f"/admin/tenants/acme/invoices/{month}{suffix}")
            assert r.status_code == expected, (suffix, r.text)


ADMIN_EDGES: list[dict[str, str]] = [
    {"until": "9999-12-31"},
    {"until": "0001-01-02"},
    {"until": "0001-01-01"},
    {"since": "0001-01-01"},
    {"since": "0001-01-01", "until": "9999-12-31"},
    {"since": "9999-12-31"},
    {"since": "1969-12-31", "until": "1970-01-05"},
    {"days": "999999999999999999999"},
    {"days": "-5"},
    {"since": "2026-02-30"},
]


@pytest.mark.parametrize("params", ADMIN_EDGES, ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in ADMIN_EDGES])
def test_admin_tenant_page_date_edges_never_5xx(server, keys, params):
    """issue 11, item 4: ``/admin/tenants/{t}?until=9999-12-31`` (and every edge) answers 200 or 400."""
    with admin_client(server, keys) as ui:
        r = ui.get("/admin/tenants/acme", params=params)
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400 and r.headers["content-type"].startswith("text/html"):
            assert 'id="error"' in r.text  # issue 12, part 7: the UI's refusals are HTML pages
        elif r.status_code == 400:  # refused by request validation, before the page runs
            assert r.json()["code"] == "invalid_request"


def test_admin_tenant_page_future_until_is_cut_at_today(server, keys, clock):
    with admin_client(server, keys) as ui:
        r = ui.get("/admin/tenants/acme", params={"until": "9999-12-31"})
        assert r.status_code == 200, r.text
        assert clock.now().date().isoformat() in r.text


@pytest.mark.parametrize("day", ["9999-12-31", "0001-01-01", "1970-01-01"])
def test_tinker_audit_day_edges_never_5xx(server, keys, day):
    """issue 11, item 4: the Tinker audit listing's ``day`` at the calendar's edges (9999-12-31 was a 500)."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        r = admin.get("/api/v1/audit", params={"day": day})
        assert r.status_code == 200, r.text
        assert r.json()["entries"] == []
