"""The admin UI in a real headless Chromium (Debian's, via Playwright): sign in, overview, tenant page,
change the window, download the invoice CSV, sign out (which also ends the session for a copied
cookie: issue 11, item 7); wrong and non-admin keys are refused; a page on another origin cannot
sign the browser in or out.

Screenshots of the main pages are written to ``docs/screenshots/`` (shown in the README).
"""

from __future__ import annotations

import csv
import io
import os
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from weightstore.billing import ledger
from weightstore.db import session_scope
from weightstore.models import Blob, Checkpoint, CheckpointFile, Tenant, TrainingRun

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
GB = 10**9


def seed(engine, now):  # type: ignore[no-untyped-def]
    """Two tenants with a month of history; acme's sampler checkpoints share the weights blob of
    its training checkpoints (dedup), some checkpoints expire soon."""
    start = (now - timedelta(days=40)).replace(hour=0, minute=0, second=0, microsecond=0)
    with session_scope(engine) as s:
        for tid in ("acme", "globex"):
            if s.get(Tenant, tid) is None:
                s.add(Tenant(id=tid, name=tid, created_at=start))
        s.flush()
        for tid, runs, base in (("acme", ("acme:run-a", "acme:run-b"), 3), ("globex", ("globex:run-x",), 1)):
            for ri, run in enumerate(runs):
                s.add(TrainingRun(id=run, tenant_id=tid, base_model="Qwen/Qwen3-8B", created_at=start, last_request_time=start))
                s.flush()
                for step in range(6):
                    at = start + timedelta(days=step * 6 + ri, hours=3)
                    weights = f"{tid}{run}{step}w".encode().hex()[:64].ljust(64, "0")
                    optim = f"{tid}{run}{step}o".encode().hex()[:64].ljust(64, "0")
                    wsize, osize = base * GB // 2 + step * 10**8, base * GB
                    for sha, size in ((weights, wsize), (optim, osize)):
                        s.add(Blob(sha256=sha, size_bytes=size, state="live", created_at=at, last_referenced_at=at))
                    s.flush()
                    for kind, files in (
                        ("training", {"adapter_model.safetensors": (weights, wsize), "optimizer.safetensors": (optim, osize)}),
                        ("sampler", {"adapter_model.safetensors": (weights, wsize)}),
                    ):
                        expires = at + timedelta(days=45 if step % 2 else 400)
                        ck = Checkpoint(
                            id=f"ck-{tid}-{ri}-{step}-{kind}",
                            tenant_id=tid,
                            run_id=run,
                            kind=kind,
                            name=f"step-{step * 100}",
                            size_bytes=sum(v[1] for v in files.values()),
                            created_at=at,
                            expires_at=expires,
                        )
                        s.add(ck)
                        s.flush()
                        for path, (sha, size) in files.items():
                            s.add(CheckpointFile(checkpoint_id=ck.id, path=path, size_bytes=size, sha256=sha))
                        ledger.on_commit(s, ck, now=at)
                        if step == 0 and kind == "sampler":  # deleted after two days
                            ck.state = "deleted"
                            ledger.on_end(s, ck, at=at + timedelta(days=2), now=at + timedelta(days=2))


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def sign_in(page, url, key):  # type: ignore[no-untyped-def]
    page.goto(url + "/admin")
    assert page.url.endswith("/admin/login")  # not signed in: redirected
    page.fill("#api_key", key)
    page.click("#sign-in")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_ui_end_to_end(server, keys, ctx, clock, browser, tmp_path):
    seed(ctx.engine, clock.now())
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))

    sign_in(page, server.url, keys.admin)
    assert page.url == server.url + "/admin"
    cookie = next(c for c in context.cookies() if c["name"] == "ws_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert keys.admin not in cookie["value"]
    rows = page.locator("#tenants tbody tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.tenant)")) == ["acme", "globex", "ops"]
    acme_monthly = page.locator('tr[data-tenant="acme"] .monthly').inner_text()
    assert acme_monthly.startswith("$") and Decimal(acme_monthly[1:]) > 0
    page.screenshot(path=str(SHOTS / "admin-overview.png"), full_page=True)

    page.click('a[href="/admin/tenants/acme"]')
    assert page.locator("#tenant-name").inner_text() == "acme"
    assert page.locator("svg.chart rect.bar").count() == 30  # default window: 30 days
    assert page.locator("#by-run tbody tr").count() == 2
    assert page.locator("#by-kind tbody tr").count() == 2
    saving = page.locator("#dedup-saving").inner_text()
    assert saving.endswith("%)") and not saving.startswith("0.000")
    assert page.locator("#largest tbody tr").count() == 10
    page.screenshot(path=str(SHOTS / "admin-tenant.png"), full_page=True)

    # change the window: the 7-day pill, then an explicit date range
    page.click("#win-7")
    assert page.locator("svg.chart rect.bar").count() == 7
    since = (clock.now() - timedelta(days=20)).date().isoformat()
    until = (clock.now() - timedelta(days=6)).date().isoformat()
    page.fill("#since", since)
    page.fill("#until", until)
    page.click("#apply-window")
    assert page.locator("svg.chart rect.bar").count() == 15
    assert f"{since} – {until}" in page.locator("#window-summary").inner_text()

    # invoice page + CSV download
    month = page.locator("#invoices a").first.inner_text()
    page.click(f'#invoices a:text-is("{month}")')
    total = page.locator("#invoice-total").inner_text()
    page.screenshot(path=str(SHOTS / "admin-invoice.png"), full_page=True)
    with page.expect_download() as dl:
        page.click("#download-csv")
    content = Path(dl.value.path()).read_text()
    lines = list(csv.DictReader(io.StringIO(content)))
    assert lines[-1]["run_id"] == "TOTAL" and "$" + lines[-1]["amount_usd"] == total
    assert sum(Decimal(x["amount_usd"]) for x in lines[:-1]) == Decimal(lines[-1]["amount_usd"])
    assert {x["tenant_id"] for x in lines} == {"acme"} and {x["kind"] for x in lines[:-1]} <= {"training", "sampler"}

    # nothing left the loopback server (no CDN), and the key never appeared in a URL
    assert all(u.startswith(server.url) for u in requests)
    assert not any(keys.admin in u for u in requests)

    page.click("#sign-out")  # the browser's own form: same origin, the session's CSRF token
    assert page.url.endswith("/admin/login")
    page.goto(server.url + "/admin/tenants/acme")
    assert page.url.endswith("/admin/login")
    context.close()
    # the cookie copied before sign-out no longer opens anything (the session ended on the server)
    replay = browser.new_context()
    replay.add_cookies([{**cookie, "expires": -1}])
    page = replay.new_page()
    page.goto(server.url + "/admin")
    assert page.url.endswith("/admin/login")
    replay.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_wrong_and_non_admin_keys_are_refused(server, keys, ctx, clock, browser):
    seed(ctx.engine, clock.now())
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, server.url, "tml-not-a-real-key")
    assert page.url.endswith("/admin/login")
    assert "not valid" in page.locator("#error").inner_text()
    sign_in(page, server.url, keys.trainer)  # acme's trainer: not an admin
    assert "not an admin key" in page.locator("#error").inner_text()
    assert not [c for c in context.cookies() if c["name"] == "ws_admin"]
    page.goto(server.url + "/admin/tenants/globex")
    assert page.url.endswith("/admin/login")  # cannot see other tenants (nor its own) in the admin UI
    # a forged cookie is ignored
    context.add_cookies([{"name": "ws_admin", "value": "eyJrIjoia2V5In0.forged.sig", "url": server.url + "/admin"}])
    page.goto(server.url + "/admin")
    assert page.url.endswith("/admin/login")
    context.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_another_origin_cannot_sign_in_or_out(server, keys, ctx, clock, browser):
    """Issue 11, item 7: a page served from another origin (here 'localhost' instead of '127.0.0.1',
    a different site to the browser) posts the admin forms with the right key: refused (403), and
    the signed-in session survives a forged sign-out."""
    seed(ctx.engine, clock.now())
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, server.url, keys.admin)
    assert page.url == server.url + "/admin"
    evil = server.url.replace("127.0.0.1", "localhost")  # same server, another origin
    forged = (
        f'<form id="f" method="post" action="{server.url}/admin/logout"><input name="csrf_token" value="x"></form>'
        f'<form id="g" method="post" action="{server.url}/admin/login"><input name="api_key" value="{keys.admin}"></form>'
    )
    page.route(evil + "/evil", lambda route: route.fulfill(status=200, content_type="text/html", body=forged))
    page.goto(evil + "/evil")
    with page.expect_navigation():
        page.evaluate("document.getElementById('f').submit()")
    assert "/admin/logout" in page.url and "Refused" in page.content()
    page.goto(server.url + "/admin")
    assert page.url == server.url + "/admin"  # still signed in
    page.goto(evil + "/evil")
    with page.expect_navigation():
        page.evaluate("document.getElementById('g').submit()")
    assert "Refused" in page.content()
    context.close()


LONG_RUN = "acme:9b1d7c1e-5a4f-4e0b-8f57-2f4c1f0a6d3e"
FITS = """els => els.map(e => [e.id || e.className, e.scrollWidth, e.clientWidth])"""


def seed_issue12(engine, now):  # type: ignore[no-untyped-def]
    """On top of ``seed``: acme's run with a UUID-long id and long checkpoint names (the largest and
    expiring soon), and tenant ``tiny`` storing 0.2 GB for ten days."""
    start = (now - timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
    with session_scope(engine) as s:
        s.add(Tenant(id="tiny", name="tiny", created_at=start))
        s.flush()
        for tid, run in (("acme", LONG_RUN), ("tiny", "tiny:run")):
            s.add(
                TrainingRun(
                    id=run, tenant_id=tid, base_model="meta-llama/Llama-3.1-70B", created_at=start, last_request_time=start
                )
            )
        s.flush()
        for tid, run, name, size in (
            ("acme", LONG_RUN, "sampler-checkpoint-step-000123456-final-merged", 9 * GB),
            ("tiny", "tiny:run", "step-1", GB // 5),
        ):
            sha = f"{tid}{name}".encode().hex()[:64].ljust(64, "0")
            s.add(Blob(sha256=sha, size_bytes=size, state="live", created_at=start, last_referenced_at=start))
            s.flush()
            ck = Checkpoint(
                id=f"ck-{tid}-long",
                tenant_id=tid,
                run_id=run,
                kind="sampler",
                name=name,
                size_bytes=size,
                created_at=start,
                expires_at=now + timedelta(days=2),
            )
            s.add(ck)
            s.flush()
            s.add(CheckpointFile(checkpoint_id=ck.id, path="adapter_model.safetensors", size_bytes=size, sha256=sha))
            ledger.on_commit(s, ck, now=start)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_tenant_and_invoice_pages_issue12(server, keys, ctx, clock, browser):
    """Issue 12, part 7: at 1280, 1366 and 1920 px no card of the tenant page scrolls or clips
    (scrollWidth <= clientWidth) and the page has no horizontal scroll; the chart's GB axis of a
    0.2 GB tenant reads "200 MB" (not "0.00 GB"); the dedup saving is shown with a unit that shows it;
    the invoice page shows its number, the provisional label, the run's base model and checkpoint
    counts; an unknown tenant is an HTML 404 page. Screenshots of the tenant page at 1280 and 1920 px."""
    seed(ctx.engine, clock.now())
    seed_issue12(ctx.engine, clock.now())
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    sign_in(page, server.url, keys.admin)
    for width in (1280, 1366, 1920):
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(server.url + "/admin/tenants/acme")
        assert "sampler-checkpoint-step-000123456-final-merged" in page.locator("#largest").inner_text()
        cards = page.locator("section.card").evaluate_all(FITS)
        assert cards and all(sw <= cw for _, sw, cw in cards), (width, cards)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), width
        if width in (1280, 1920):  # the trash card's shots: test_tenants_page_forms_and_restore_issue12 (a full trash)
            page.screenshot(path=str(SHOTS / f"admin-tenant-{width}.png"), full_page=True)
    saving = page.locator("#dedup-saving").inner_text()
    number, unit = saving.split(" (")[0].split(" ")
    assert unit in ("MB", "GB", "TB") and Decimal(number) > 0 and saving.endswith("%)")

    page.goto(server.url + "/admin/tenants/tiny?days=7")
    assert page.locator("#axis-gb-max").text_content() == "200 MB"
    assert page.locator("#logical-gb").inner_text() == "200 MB"

    month = clock.now().strftime("%Y-%m")
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(server.url + f"/admin/tenants/tiny/invoices/{month}")
    assert page.locator("#invoice-number").inner_text() == f"WS-tiny-{month.replace('-', '')}"
    assert page.locator("#invoice-status").inner_text() == "Provisional · to date"
    assert page.locator("#invoice-lines tbody tr .base-model").all_inner_texts() == ["meta-llama/Llama-3.1-70B"]
    assert page.locator("#invoice-lines tbody tr .count").all_inner_texts() == ["1"]
    page.screenshot(path=str(SHOTS / "admin-invoice-provisional.png"), full_page=True)

    resp = page.goto(server.url + "/admin/tenants/nope")
    assert resp is not None and resp.status == 404
    assert resp.headers["content-type"].startswith("text/html")
    assert page.locator("#error").inner_text() == "tenant nope not found"
    resp = page.goto(server.url + "/admin/tenants/acme/invoices/2026-13")
    assert resp is not None and resp.status == 400 and resp.headers["content-type"].startswith("text/html")
    context.close()


def seed_trash(engine, now):  # type: ignore[no-untyped-def]
    """acme: two sampler checkpoints past their ``expires_at`` (the collector has not run): in the trash."""
    with session_scope(engine) as s:
        for i, name in enumerate(("step-900", "sampler-checkpoint-step-000999999-final-merged")):
            sha = f"trash{i}".encode().hex().ljust(64, "0")
            at = now - timedelta(days=3)
            s.add(Blob(sha256=sha, size_bytes=GB // 4, state="live", created_at=at, last_referenced_at=at))
            s.flush()
            ck = Checkpoint(
                id=f"ck-acme-trash-{i}",
                tenant_id="acme",
                run_id="acme:run-a",
                kind="sampler",
                name=name,
                size_bytes=GB // 4,
                created_at=at,
                expires_at=now - timedelta(hours=1 + i),
            )
            s.add(ck)
            s.flush()
            s.add(CheckpointFile(checkpoint_id=ck.id, path="adapter_model.safetensors", size_bytes=GB // 4, sha256=sha))
            ledger.on_commit(s, ck, now=at)


def assert_fits(page, width):  # type: ignore[no-untyped-def]
    cards = page.locator("section.card").evaluate_all(FITS)
    assert cards and all(sw <= cw for _, sw, cw in cards), (width, page.url, cards)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (width, page.url)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_tenants_page_forms_and_restore_issue12(server, keys, ctx, clock, browser):
    """Issue 12, parts 1-3 and 5 in a real browser: create a tenant from the tenants page (and a
    duplicate is refused with a message), disable and enable it, delete it through the confirmation
    page (the overview then lists it only as deleted), restore a checkpoint with the Trash card's
    button; no card of the tenants, manage and tenant pages clips at 1280, 1366 and 1920 px.
    Screenshots of the tenants page and of the trash card at 1280 and 1920 px."""
    seed(ctx.engine, clock.now())
    seed_issue12(ctx.engine, clock.now())
    seed_trash(ctx.engine, clock.now())
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, server.url, keys.admin)

    page.click("#tenants-link")
    assert page.url == server.url + "/admin/tenants"
    page.fill("#new-name", "initech")
    page.fill("#new-price", "0.05")
    page.fill("#new-quota", "500 GB")
    page.fill("#new-soft-quota", "400 GB")
    page.click("#create-button")
    assert page.locator("#flash").inner_text() == "Tenant initech created."
    row = page.locator('#tenant-list tr[data-tenant="initech"]')
    assert row.locator(".state").inner_text() == "active"
    assert row.locator(".quota").inner_text() == "500 GB" and row.locator(".soft").inner_text() == "400 GB"
    page.fill("#new-name", "initech")
    page.click("#create-button")
    assert page.locator("#action-error").inner_text() == "tenant initech already exists"

    for width in (1280, 1366, 1920):
        page.set_viewport_size({"width": width, "height": 900})
        for url in ("/admin/tenants", "/admin/tenants/initech/manage", "/admin/tenants/acme"):
            page.goto(server.url + url)
            assert_fits(page, width)
            if width in (1280, 1920) and url == "/admin/tenants":
                page.screenshot(path=str(SHOTS / f"admin-tenants-{width}.png"), full_page=True)
            if width in (1280, 1920) and url == "/admin/tenants/acme":
                page.locator("#trash-card").screenshot(path=str(SHOTS / f"admin-trash-{width}.png"))
    page.set_viewport_size({"width": 1280, "height": 900})

    # restore from the trash card: the TTL field starts at acme's default (none here: empty = no expiry)
    page.goto(server.url + "/admin/tenants/acme")
    entry = page.locator("#trash tbody tr").first
    path = entry.get_attribute("data-path")
    assert path is not None and path.endswith("/step-900")
    assert entry.locator('input[name="ttl_seconds"]').input_value() == ""
    entry.locator('input[name="ttl_seconds"]').fill("86400")
    entry.locator(".restore-button").click()
    until = (clock.now() + timedelta(seconds=86400)).strftime("%Y-%m-%d %H:%M UTC")
    assert page.locator("#flash").inner_text() == f"Restored {path} (expires {until})."
    assert page.locator(f'#trash tr[data-path="{path}"]').count() == 0
    with session_scope(ctx.engine) as s:
        ck = s.get(Checkpoint, "ck-acme-trash-0")
        assert ck is not None and ck.state == "committed" and ck.expires_at == clock.now() + timedelta(seconds=86400)

    # disable / enable, then delete with the confirmation step
    page.goto(server.url + "/admin/tenants/initech/manage")
    page.click("#disable")
    assert page.locator("#tenant-state").inner_text() == "disabled"
    page.click("#enable")
    assert page.locator("#tenant-state").inner_text() == "active"
    page.click("#delete-link")
    assert page.url == server.url + "/admin/tenants/initech/delete"
    page.fill("#confirm", "initech")
    page.click("#confirm-delete")
    assert page.locator("#flash").inner_text().startswith("Tenant initech deleted:")
    assert page.locator('#tenant-list tr[data-tenant="initech"] .state').inner_text() == "deleted"
    page.goto(server.url + "/admin")
    assert page.locator('#tenants tr[data-tenant="initech"]').count() == 0
    assert page.locator('#deleted-tenants tr[data-tenant="initech"]').count() == 1
    context.close()
