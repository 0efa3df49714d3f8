"""Form handling of the admin UI's tenant management and trash restore (issue 12, parts 1-4), at the
HTTP level (a live server, a browser-like httpx client with cookies): every form POST goes through
``weightstore.tenants`` / ``weightstore.retention``, answers post/redirect/get on success, shows a
refusal as a readable HTML message with the error table's status (never JSON, never 500), and is
refused (403, nothing changed) without the session's CSRF token or from another origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from html import unescape

import httpx
import pytest
from sqlmodel import col, select

from tests.collector._util import download, new_run, principal, save
from tests.helpers import sampler_files
from tests.security.test_keys_and_sessions import _form_token, sign_in, ui_client
from weightstore import retention
from weightstore import tenants as tenants_core
from weightstore.db import session_scope
from weightstore.models import Checkpoint, Tenant, UsageEvent

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _post(ui: httpx.Client, url: str, data: dict[str, str], *, page: str, origin: str | None = "same") -> httpx.Response:
    """Load ``page`` (for its form's CSRF token, unless ``data`` brings one) and post like a browser."""
    token = _form_token(ui.get(page).text)
    headers = {"Origin": str(ui.base_url).rstrip("/")} if origin == "same" else ({"Origin": origin} if origin else {})
    return ui.post(url, data={"csrf_token": token, **data}, headers=headers)


def _message(html: str, element_id: str) -> str | None:
    m = re.search(rf'id="{element_id}">([^<]*)<', html)
    return unescape(m.group(1)) if m else None


def _tenant_row(html: str, tenant: str) -> str | None:
    m = re.search(rf'<tr data-tenant="{tenant}"[^>]*>(.*?)</tr>', html, re.S)
    return m.group(1) if m else None


@contextmanager
def _signed_in(server, keys) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with ui_client(server) as ui:
        assert sign_in(ui, keys.admin).status_code == 303
        yield ui


def test_create_tenant_appears_and_refusals_are_readable(server, keys, ctx):
    """issue 12, part 1: the create form makes an active tenant with its price and quotas, listed on
    the tenants page; a duplicate name, a bad size and soft > hard come back as the page with a
    readable message and the error table's 400 (never JSON or 500), the form keeping what was typed."""
    with _signed_in(server, keys) as ui:
        r = _post(
            ui,
            "/admin/tenants",
            {"name": "initech", "price": "0.05", "quota": "500 GB", "soft_quota": "0.4TB"},
            page="/admin/tenants",
        )
        assert r.status_code == 303 and r.headers["location"].startswith("/admin/tenants?flash=")
        page = ui.get(r.headers["location"]).text
        assert _message(page, "flash") == "Tenant initech created."
        row = _tenant_row(page, "initech")
        assert row is not None and "state-active" in row and "0.05" in row and "override" in row
        assert ">500 GB<" in row and ">400 GB<" in row
        with session_scope(ctx.engine) as s:
            t = s.get(Tenant, "initech")
            assert t is not None
            assert (t.state, t.price_per_gb_month_usd, t.quota_bytes, t.soft_quota_bytes) == (
                "active",
                0.05,
                500 * 10**9,
                400 * 10**9,
            )

        for data, message in (
            ({"name": "initech"}, "tenant initech already exists"),
            (
                {"name": "hooli", "quota": "lots"},
                "hard quota: 'lots' is not a size (e.g. 500 GB, 2 TiB or a number of bytes; empty for none)",
            ),
            (
                {"name": "hooli", "quota": "1 GB", "soft_quota": "2 GB"},
                "soft_quota_bytes (2000000000) must not exceed quota_bytes (1000000000)",
            ),
            (
                {"name": "hooli", "price": "-1"},
                "price_per_gb_month_usd must be between 0 and 1000000 USD per GB-month (-1.0 given)",
            ),
            (
                {"name": "hooli", "price": "cheap"},
                "price: 'cheap' is not a price in USD per GB-month (e.g. 0.021; empty for the default rate)",
            ),
        ):
            r = _post(ui, "/admin/tenants", data, page="/admin/tenants")
            assert r.status_code == 400 and r.headers["content-type"].startswith("text/html"), (data, r.text[:300])
            assert _message(r.text, "action-error") == message
            assert f'value="{data["name"]}"' in r.text  # the form keeps what was typed
        with session_scope(ctx.engine) as s:
            assert s.get(Tenant, "hooli") is None  # no refused create left anything behind


def test_settings_and_operator_refusals(server, keys, ctx):
    """issue 12, part 1: the manage page saves price and quotas (an empty field clears one); disabling
    the operator tenant, or one holding an admin key, is refused with the core's message on the page
    and the tenant stays active; a refused update changes nothing (rolled back)."""
    with session_scope(ctx.engine) as s:
        s.add(Tenant(id="admin", name="admin", created_at=ctx.clock.now(), operator=True))
    with _signed_in(server, keys) as ui:
        r = _post(
            ui,
            "/admin/tenants/acme/settings",
            {"price": "0.1", "quota": "2 GB", "soft_quota": ""},
            page="/admin/tenants/acme/manage",
        )
        assert r.status_code == 303
        page = ui.get(r.headers["location"]).text
        assert _message(page, "flash") == "Tenant acme: name, price and quotas saved."
        assert 'id="quota" value="2 GB"' in page and 'id="price" value="0.1"' in page
        assert 'id="display-name" value="acme"' in page  # an empty name kept the current one

        # the display name (issue 12, part 1 "tenants set NAME --name"): renamed, refused when taken or
        # invalid with the core's message, and nothing else changes on a refusal
        r = _post(
            ui,
            "/admin/tenants/acme/settings",
            {"name": "acme-research", "price": "0.1", "quota": "2 GB"},
            page="/admin/tenants/acme/manage",
        )
        assert r.status_code == 303
        assert 'id="display-name" value="acme-research"' in ui.get(r.headers["location"]).text
        for taken, message in (
            ("globex", "tenant globex already exists"),
            ("Acme Corp", "tenant 'Acme Corp' must be lowercase letters, digits, '_' or '-' (max 64)"),
        ):
            r = _post(
                ui,
                "/admin/tenants/acme/settings",
                {"name": taken, "price": "7", "quota": "2 GB"},
                page="/admin/tenants/acme/manage",
            )
            assert r.status_code == 400, (taken, r.status_code)
            assert _message(r.text, "action-error") == message
        with session_scope(ctx.engine) as s:
            t = s.get(Tenant, "acme")
            assert t is not None and (t.name, t.price_per_gb_month_usd) == ("acme-research", 0.1)
        r = _post(
            ui,
            "/admin/tenants/acme/settings",
            {"price": "", "quota": "1 GB", "soft_quota": "5 GB"},
            page="/admin/tenants/acme/manage",
        )
        assert r.status_code == 400
        assert _message(r.text, "action-error") == "soft_quota_bytes (5000000000) must not exceed quota_bytes (1000000000)"
        with session_scope(ctx.engine) as s:
            t = s.get(Tenant, "acme")
            assert t is not None and (t.price_per_gb_month_usd, t.quota_bytes, t.soft_quota_bytes) == (0.1, 2 * 10**9, None)

        for tenant, message in (
            ("admin", "tenant admin is the operator tenant: it cannot be disabled"),
            ("ops", "tenant ops holds 1 active admin key(s): revoke them before it can be disabled"),
        ):
            r = _post(ui, f"/admin/tenants/{tenant}/state", {"action": "disable"}, page=f"/admin/tenants/{tenant}/manage")
            assert r.status_code == 400 and _message(r.text, "action-error") == message
            r = _post(ui, f"/admin/tenants/{tenant}/delete", {"confirm": tenant}, page=f"/admin/tenants/{tenant}/delete")
            assert r.status_code == 400 and _message(r.text, "action-error") == message.replace("disabled", "deleted")
            with session_scope(ctx.engine) as s:
                assert s.get(Tenant, tenant).state == "active"  # type: ignore[union-attr]


def test_default_ttls_are_set_refused_out_of_range_and_cleared(server, keys, ctx):
    """issue 12, part 3 (per-tenant defaults, in the UI as in `gc default-ttl` and the API): saved, shown
    in the form, refused out of the TTL bounds or when not whole seconds with nothing changed, cleared by
    an empty field; a save without a TTL then gets the tenant's default."""
    with _signed_in(server, keys) as ui:
        page = "/admin/tenants/acme/manage"
        r = _post(ui, "/admin/tenants/acme/default-ttl", {"training": "604800", "sampler": "86400"}, page=page)
        assert r.status_code == 303
        shown = ui.get(r.headers["location"]).text
        assert _message(shown, "flash") == "Tenant acme: default TTLs saved."
        assert 'id="default-ttl-training" value="604800"' in shown and 'id="default-ttl-sampler" value="86400"' in shown
        for training, sampler in (("5", "86400"), ("604800", "1 day"), ("604800", "-1")):
            r = _post(ui, "/admin/tenants/acme/default-ttl", {"training": training, "sampler": sampler}, page=page)
            assert r.status_code == 400, (training, sampler, r.status_code)
            assert _message(r.text, "action-error"), r.text[:300]
        with session_scope(ctx.engine) as s:
            t = s.get(Tenant, "acme")
            assert t is not None and (t.default_ttl_training_seconds, t.default_ttl_sampler_seconds) == (604800, 86400)
        p = principal(ctx, keys.trainer)
        path = save(ctx, p, new_run(ctx, p), "defaulted", sampler_files(5))
        with session_scope(ctx.engine) as s:
            run_id, _, name = path.removeprefix("tinker://").partition("/sampler_weights/")
            ck = s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.name == name)).one()
            assert ck.expires_at == ck.created_at + timedelta(seconds=86400)
        r = _post(ui, "/admin/tenants/acme/default-ttl", {"training": "", "sampler": ""}, page=page)
        assert r.status_code == 303
        with session_scope(ctx.engine) as s:
            t = s.get(Tenant, "acme")
            assert t is not None and (t.default_ttl_training_seconds, t.default_ttl_sampler_seconds) == (None, None)


def test_disable_refuses_the_tenants_keys_until_enabled(server, keys):
    """issue 12, part 1: Disable on the manage page makes every key of the tenant answer 403
    ``tenant_disabled``; Enable lets them in again."""
    with _signed_in(server, keys) as ui, httpx.Client(base_url=server.url, headers={"X-API-Key": keys.trainer}) as trainer:
        assert trainer.get("/v1/trash").status_code == 200
        r = _post(ui, "/admin/tenants/acme/state", {"action": "disable"}, page="/admin/tenants/acme/manage")
        assert r.status_code == 303
        page = ui.get(r.headers["location"]).text
        assert _message(page, "flash") == "Tenant acme disabled: its keys are refused until it is enabled."
        assert _message(page, "tenant-state") == "disabled"
        r = trainer.get("/v1/trash")
        assert (r.status_code, r.json()["code"]) == (403, "tenant_disabled")
        assert _tenant_row(ui.get("/admin").text, "acme") is not None  # still billed: still on the overview
        r = _post(ui, "/admin/tenants/acme/state", {"action": "enable"}, page="/admin/tenants/acme/manage")
        assert r.status_code == 303
        assert trainer.get("/v1/trash").status_code == 200


def test_delete_needs_confirmation_and_leaves_the_active_list(server, keys, ctx, clock):
    """issue 12, parts 1 and 2: the delete page states what a delete does and needs the tenant's id
    typed (else 400, nothing deleted); after it the overview no longer lists the tenant among the
    billed ones but under "Deleted tenants · final invoices" with a link to this month's invoice,
    its keys are refused, and the tenants page shows it as deleted."""
    p = principal(ctx, keys.other_trainer)
    save(ctx, p, new_run(ctx, p), "x", sampler_files(1), ttl=3600)
    with _signed_in(server, keys) as ui:
        confirm = ui.get("/admin/tenants/globex/delete").text
        assert _message(confirm, "delete-checkpoints") == "1" and _message(confirm, "delete-keys") == "1"
        r = _post(ui, "/admin/tenants/globex/delete", {"confirm": "globe"}, page="/admin/tenants/globex/delete")
        assert r.status_code == 400 and _message(r.text, "action-error") == "type the tenant's id (globex) to confirm the delete"
        assert _tenant_row(ui.get("/admin").text, "globex") is not None
        r = _post(ui, "/admin/tenants/globex/delete", {"confirm": "globex"}, page="/admin/tenants/globex/delete")
        assert r.status_code == 303
        assert _message(ui.get(r.headers["location"]).text, "flash") == (
            "Tenant globex deleted: 1 checkpoint(s) deleted, 1 key(s) revoked, 0 upload(s) aborted, 0 export(s) cancelled. "
            "Its invoices stay readable."
        )
        overview = ui.get("/admin").text
        billed = overview[overview.index('<table id="tenants">') : overview.index("</table>")]
        assert 'data-tenant="globex"' not in billed and 'data-tenant="acme"' in billed
        deleted = overview[overview.index('id="deleted-tenants"') :]
        month = clock.now().strftime("%Y-%m")
        assert f'<a href="/admin/tenants/globex/invoices/{month}">{month}</a>' in deleted
        assert '<tr data-tenant="globex" data-state="deleted"' in ui.get("/admin/tenants").text
        assert ui.get(f"/admin/tenants/globex/invoices/{month}").status_code == 200
    r = httpx.get(server.url + "/v1/trash", headers={"X-API-Key": keys.other_trainer})
    assert r.status_code == 401


def test_restore_button_brings_a_checkpoint_back(server, keys, ctx, clock):
    """issue 12, parts 3 and 4: the Trash card proposes the tenant's default TTL for the kind; its
    Restore button makes the checkpoint readable again with that TTL, and the ledger reads as the
    trash tests expect (end at ``expires_at``, restore at now); a second restore, another tenant's
    checkpoint or a TTL out of range come back as a readable message on the tenant page."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(5)
    committed_at = clock.now()
    path = save(ctx, p, run_id, "gone", files, ttl=3600)
    expires_at = committed_at + timedelta(seconds=3600)
    other = principal(ctx, keys.other_trainer)
    save(ctx, other, new_run(ctx, other), "theirs", sampler_files(6), ttl=3600)
    clock.advance(3601)
    with session_scope(ctx.engine) as s:
        retention.set_default_ttl(s, "acme", settings=ctx.settings, sampler=7200)
        cid = s.exec(select(Checkpoint.id).where(Checkpoint.name == "gone")).one()
        theirs = s.exec(select(Checkpoint.id).where(Checkpoint.name == "theirs")).one()
    with _signed_in(server, keys) as ui:
        page = ui.get("/admin/tenants/acme").text
        row = page[page.index(f'<tr data-path="{path}">') :]
        assert f'name="checkpoint_id" value="{cid}"' in row[: row.index("</tr>")]
        assert 'name="ttl_seconds" inputmode="numeric" size="8" value="7200"' in row[: row.index("</tr>")]

        r = _post(ui, "/admin/tenants/acme/trash/restore", {"checkpoint_id": cid, "ttl_seconds": "5"}, page="/admin/tenants/acme")
        assert r.status_code == 400 and r.headers["content-type"].startswith("text/html")
        lo, hi = ctx.settings.ttl_min_seconds, ctx.settings.ttl_max_seconds
        assert _message(r.text, "action-error") == f"Restore refused: ttl_seconds is out of range ({lo}..{hi})"
        r = _post(
            ui, "/admin/tenants/acme/trash/restore", {"checkpoint_id": theirs, "ttl_seconds": ""}, page="/admin/tenants/acme"
        )
        assert r.status_code == 404
        assert _message(r.text, "action-error") == f"Restore refused: checkpoint {theirs} is not in tenant acme's trash"

        restored_at = clock.now()
        r = _post(
            ui, "/admin/tenants/acme/trash/restore", {"checkpoint_id": cid, "ttl_seconds": "7200"}, page="/admin/tenants/acme"
        )
        assert r.status_code == 303 and r.headers["location"].startswith("/admin/tenants/acme?flash=")
        page = ui.get(r.headers["location"]).text
        until = (restored_at + timedelta(seconds=7200)).strftime("%Y-%m-%d %H:%M UTC")
        assert _message(page, "flash") == f"Restored {path} (expires {until})."
        assert f'data-path="{path}"' not in page
        r = _post(
            ui, "/admin/tenants/acme/trash/restore", {"checkpoint_id": cid, "ttl_seconds": "7200"}, page="/admin/tenants/acme"
        )
        assert r.status_code == 400
        assert (
            _message(r.text, "action-error")
            == f"Restore refused: checkpoint {cid} is committed; only expired checkpoints can be restored"
        )
    assert download(ctx, p, path) == files
    with session_scope(ctx.engine) as s:
        events = [
            (e.event, e.at)
            for e in s.exec(select(UsageEvent).where(UsageEvent.checkpoint_id == cid).order_by(col(UsageEvent.id)))
        ]
        ck = s.get(Checkpoint, cid)
        assert ck is not None and ck.expires_at == restored_at + timedelta(seconds=7200)
    assert events == [("commit", committed_at), ("end", expires_at), ("restore", restored_at)]


def test_posts_without_token_or_from_another_origin_are_refused(server, keys, ctx):
    """issue 12, part 1 (CSRF): every management POST without the session's CSRF token, with a
    foreign ``Origin`` or with none is refused (403, the "Refused" page) and changes nothing; a
    signed-out POST from this origin goes to the sign-in page; a forged flash message is not shown."""
    posts = (
        ("/admin/tenants", {"name": "evil"}),
        ("/admin/tenants/acme/settings", {"price": "99", "quota": "1"}),
        ("/admin/tenants/acme/state", {"action": "disable"}),
        ("/admin/tenants/acme/default-ttl", {"training": "7200", "sampler": "7200"}),
        ("/admin/tenants/acme/delete", {"confirm": "acme"}),
        ("/admin/tenants/acme/trash/restore", {"checkpoint_id": "x", "ttl_seconds": ""}),
    )
    with _signed_in(server, keys) as ui:
        own = str(ui.base_url).rstrip("/")
        token = _form_token(ui.get("/admin/tenants").text)
        for url, data in posts:
            for headers, form in (
                ({"Origin": own}, data),  # no token
                ({"Origin": own}, {**data, "csrf_token": "0" * 64}),  # a wrong token
                ({"Origin": own.replace("127.0.0.1", "localhost")}, {**data, "csrf_token": token}),  # another origin
                ({}, {**data, "csrf_token": token}),  # no Origin nor Referer
            ):
                r = ui.post(url, data=form, headers=headers)
                assert r.status_code == 403 and "Refused" in r.text, (url, headers, r.status_code)
        forged = ui.get("/admin/tenants", params={"flash": "All tenants deleted.", "sig": "0" * 64}).text
        assert _message(forged, "flash") is None
    with ui_client(server) as anonymous:
        r = anonymous.post("/admin/tenants", data={"name": "evil"}, headers={"Origin": own})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    with session_scope(ctx.engine) as s:
        acme = s.get(Tenant, "acme")
        assert s.get(Tenant, "evil") is None and acme is not None
        assert (acme.state, acme.price_per_gb_month_usd, acme.quota_bytes) == ("active", None, None)


def test_overview_lists_a_deleted_tenant_apart(server, keys, ctx, clock):
    """issue 12, part 2: a tenant deleted through the core (CLI/API) is not in the overview's billed
    tenants table nor its totals; it appears only under "Deleted tenants · final invoices"."""
    p = principal(ctx, keys.other_trainer)
    save(ctx, p, new_run(ctx, p), "x", sampler_files(2), ttl=None)
    with session_scope(ctx.engine) as s:
        tenants_core.delete(s, "globex", now=clock.now())
    with _signed_in(server, keys) as ui:
        overview = ui.get("/admin").text
    billed = overview[overview.index('<table id="tenants">') : overview.index("</table>")]
    assert re.findall(r'<tr data-tenant="([^"]+)"', billed) == ["acme", "ops"]
    assert re.findall(r'<tr data-tenant="([^"]+)"', overview[overview.index('id="deleted-tenants"') :]) == ["globex"]
