"""Issue 11, item 7: admin UI sessions live on the server (sign-out and key revocation end them),
every state-changing UI POST is same-origin and carries a CSRF token, and key revocation follows
one rule set in ``weightstore.auth.revoke_key`` (roles matrix in docs/design.md) through the HTTP
API and the CLI alike."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
from sqlmodel import col, select
from typer.testing import CliRunner

from weightstore import db
from weightstore.models import ApiKey, Role
from weightstore_cli import app as cli_app

COOKIE = "ws_admin"


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


# --- admin UI helpers ---------------------------------------------------------------------------
def _form_token(html: str) -> str:
    """The CSRF token the server put in a form ("" when it puts none)."""
    m = re.search(r'name="csrf_token" value="([^"]*)"', html)
    return m.group(1) if m else ""


def ui_client(server, **kw) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(base_url=server.url, follow_redirects=False, timeout=30, **kw)


def sign_in(c: httpx.Client, key: str, *, origin: str | None = "same", token: str | None = None) -> httpx.Response:
    """Load the sign-in form (which sets the double-submit cookie) and post it, as a browser does."""
    form = c.get("/admin/login")
    assert form.status_code == 200
    headers = {"Origin": str(c.base_url).rstrip("/")} if origin == "same" else ({"Origin": origin} if origin else {})
    data = {"api_key": key, "csrf_token": _form_token(form.text) if token is None else token}
    return c.post("/admin/login", data=data, headers=headers)


def page_token(c: httpx.Client) -> str:
    page = c.get("/admin")
    assert page.status_code == 200
    return _form_token(page.text)


def sign_out(c: httpx.Client, *, origin: str | None = "same", token: str | None = None) -> httpx.Response:
    tok = page_token(c) if token is None else token
    headers = {"Origin": str(c.base_url).rstrip("/")} if origin == "same" else ({"Origin": origin} if origin else {})
    return c.post("/admin/logout", data={"csrf_token": tok}, headers=headers)


def signed_in(server, cookie: str) -> bool:  # type: ignore[no-untyped-def]
    """Does this cookie value, replayed from another client, still open the overview?"""
    with ui_client(server, cookies={COOKIE: cookie}) as other:
        r = other.get("/admin")
    if r.status_code == 200:
        return True
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    return False


# --- sessions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sign_out_ends_the_session_for_a_copied_cookie(server, keys):
    """Issue 11, item 7: after sign-out a copied session cookie is refused (it used to work for 12 h)."""
    with ui_client(server) as c:
        assert sign_in(c, keys.admin).status_code == 303
        copied = c.cookies[COOKIE]
        assert keys.admin not in copied
        assert signed_in(server, copied)
        out = sign_out(c)
        assert out.status_code == 303 and out.headers["location"] == "/admin/login"
    assert not signed_in(server, copied)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_revoking_the_key_ends_its_sessions(server, keys, ctx):
    """Issue 11, item 7: a key's revocation ends every UI session signed in with it, at once."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        second = admin.post("/v1/keys", json={"tenant": "ops", "role": "admin"}).json()
        with ui_client(server) as c:
            assert sign_in(c, second["api_key"]).status_code == 303
            copied = c.cookies[COOKIE]
        assert signed_in(server, copied)
        assert admin.delete(f"/v1/keys/{second['key_id']}").status_code == 200
    assert not signed_in(server, copied)
    from weightstore.models import AdminUiSession

    with db.session_scope(ctx.engine) as s:
        rows = list(s.exec(select(AdminUiSession).where(AdminUiSession.key_id == second["key_id"])))
    assert len(rows) == 1 and rows[0].revoked_at is not None
    assert second["api_key"] not in repr(rows[0].model_dump()) and copied not in repr(rows[0].model_dump())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_session_expires_and_idles_out(server, keys, clock):
    """Issue 11, item 7: a session ends after its lifetime, and earlier when left idle."""
    with ui_client(server) as c:
        assert sign_in(c, keys.admin).status_code == 303
        cookie = c.cookies[COOKIE]
    clock.advance(minutes=50)
    assert signed_in(server, cookie)  # also marks it seen
    clock.advance(minutes=50)
    assert signed_in(server, cookie)
    clock.advance(hours=2)  # idle for longer than the idle limit
    assert not signed_in(server, cookie)
    with ui_client(server) as c:
        assert sign_in(c, keys.admin).status_code == 303
        cookie = c.cookies[COOKIE]
    for _ in range(13):  # seen every 55 minutes (715 minutes in all) ...
        clock.advance(minutes=55)
        assert signed_in(server, cookie)
    clock.advance(minutes=55)  # ... but never past the absolute lifetime of 12 hours
    assert not signed_in(server, cookie)


# --- CSRF / Origin ------------------------------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sign_in_refuses_cross_origin_and_tokenless_posts(server, keys):
    """Issue 11, item 7: sign-in needs a same-origin request and the form's CSRF token."""
    for origin, token in (
        ("https://evil.example", None),  # cross-origin form post
        ("null", None),  # sandboxed or privacy-redirected origin
        (None, None),  # neither Origin nor Referer
        ("same", ""),  # no token
        ("same", "forged-token"),
    ):
        with ui_client(server) as c:
            r = sign_in(c, keys.admin, origin=origin, token=token)
            assert r.status_code == 403, (origin, token, r.status_code)
            assert COOKIE not in c.cookies
    with ui_client(server) as c:  # a Referer on the same origin stands in for a missing Origin
        form = c.get("/admin/login")
        r = c.post(
            "/admin/login",
            data={"api_key": keys.admin, "csrf_token": _form_token(form.text)},
            headers={"Referer": server.url + "/admin/login"},
        )
        assert r.status_code == 303 and COOKIE in c.cookies
    with ui_client(server) as c:  # ... but a foreign Referer does not
        form = c.get("/admin/login")
        r = c.post(
            "/admin/login",
            data={"api_key": keys.admin, "csrf_token": _form_token(form.text)},
            headers={"Referer": "https://evil.example/admin/login"},
        )
        assert r.status_code == 403 and COOKIE not in c.cookies


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sign_out_refuses_cross_origin_and_tokenless_posts(server, keys):
    """Issue 11, item 7: sign-out needs a same-origin request and the session's CSRF token; a refused
    sign-out leaves the session as it was."""
    with ui_client(server) as c:
        assert sign_in(c, keys.admin).status_code == 303
        cookie = c.cookies[COOKIE]
        assert sign_out(c, origin="https://evil.example").status_code == 403
        assert sign_out(c, origin=None).status_code == 403
        assert sign_out(c, token="").status_code == 403
        with ui_client(server) as other:  # another session's token does not fit this session
            assert sign_in(other, keys.admin).status_code == 303
            foreign = page_token(other)
        assert sign_out(c, token=foreign).status_code == 403
        assert signed_in(server, cookie)
        assert sign_out(c).status_code == 303
    assert not signed_in(server, cookie)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cookie_flags(server, keys):
    """Issue 11, item 7: cookies are HttpOnly and SameSite=Strict, and Secure when the request is https
    (here: behind a TLS-terminating proxy on loopback that sets X-Forwarded-Proto)."""
    with ui_client(server) as c:
        r = sign_in(c, keys.admin)
        header = r.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=strict" in header and "secure" not in header
    with ui_client(server, headers={"X-Forwarded-Proto": "https"}) as c:
        form = c.get("/admin/login")
        assert all("secure" in h.lower() for h in form.headers.get_list("set-cookie"))
        r = c.post(
            "/admin/login",
            data={"api_key": keys.admin, "csrf_token": _form_token(form.text)},
            headers={"Origin": server.url.replace("http://", "https://"), "Cookie": form.headers["set-cookie"].split(";")[0]},
        )
        assert r.status_code == 303
        header = r.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=strict" in header and "secure" in header


# --- key revocation rules -----------------------------------------------------------------------
def _create(admin: httpx.Client, tenant: str, role: str) -> dict:  # type: ignore[type-arg]
    r = admin.post("/v1/keys", json={"tenant": tenant, "role": role, "create_tenant": True})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _active_admins(ctx) -> list[str]:  # type: ignore[no-untyped-def]
    with db.session_scope(ctx.engine) as s:
        q = select(ApiKey.id).where(ApiKey.role == Role.admin.value, col(ApiKey.revoked_at).is_(None))
        return list(s.exec(q))


def test_revocation_roles_matrix_http(server, keys, ctx):
    """Issue 11, item 7: a trainer cannot revoke an admin key of its own tenant; the roles matrix holds
    through the HTTP API (and refusals are 403/404, never 409)."""

    def client(key: str) -> httpx.Client:
        return httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=30)

    with client(keys.admin) as admin, client(keys.trainer) as trainer, client(keys.reader) as reader:
        acme_admin = _create(admin, "acme", "admin")
        acme_trainer = _create(admin, "acme", "trainer")
        acme_reader = _create(admin, "acme", "reader")
        globex_reader = _create(admin, "globex", "reader")
        # trainer: not above its own role, own tenant only
        assert_error(trainer.delete(f"/v1/keys/{acme_admin['key_id']}"), 403, "forbidden")
        assert_error(trainer.delete(f"/v1/keys/{globex_reader['key_id']}"), 404, "not_found")  # as if missing
        assert_error(trainer.delete("/v1/keys/key-does-not-exist"), 404, "not_found")
        assert trainer.delete(f"/v1/keys/{acme_trainer['key_id']}").json()["revoked_at"] is not None
        # reader: only itself
        assert_error(reader.delete(f"/v1/keys/{acme_reader['key_id']}"), 403, "forbidden")
        assert_error(reader.delete(f"/v1/keys/{acme_admin['key_id']}"), 403, "forbidden")
        with client(acme_reader["api_key"]) as second_reader:
            assert second_reader.delete(f"/v1/keys/{acme_reader['key_id']}").status_code == 200
            assert_error(second_reader.get("/v1/keys"), 401, "unauthenticated")
        # the acme admin key still works; a trainer may revoke a reader and itself
        with client(acme_admin["api_key"]) as acme_admin_client:
            assert acme_admin_client.get("/v1/keys").status_code == 200
        me = trainer.get("/v1/keys").json()
        reader_id = next(k["key_id"] for k in me if k["role"] == "reader" and k["revoked_at"] is None)
        assert trainer.delete(f"/v1/keys/{reader_id}").status_code == 200
        own_id = next(k["key_id"] for k in me if k["prefix"] == keys.trainer[:10])
        assert trainer.delete(f"/v1/keys/{own_id}").status_code == 200
        assert_error(trainer.get("/v1/keys"), 401, "unauthenticated")
        # an admin revokes across tenants
        assert admin.delete(f"/v1/keys/{globex_reader['key_id']}").status_code == 200
    assert sorted(_active_admins(ctx)) == sorted([acme_admin["key_id"], *_ops_admin(ctx, keys)])


def _ops_admin(ctx, keys) -> list[str]:  # type: ignore[no-untyped-def]
    from weightstore.auth import hash_key

    with db.session_scope(ctx.engine) as s:
        return list(s.exec(select(ApiKey.id).where(ApiKey.key_hash == hash_key(keys.admin))))


def test_last_admin_key_cannot_be_revoked_http(server, keys, ctx):
    """Issue 11, item 7: nobody can revoke the last active admin key of the deployment, not even with
    itself (400 invalid_request); revoking the key in use is fine while another admin key remains."""
    [ops_admin] = _ops_admin(ctx, keys)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        assert_error(admin.delete(f"/v1/keys/{ops_admin}"), 400, "invalid_request")
        second = _create(admin, "ops", "admin")
        assert admin.delete(f"/v1/keys/{ops_admin}").status_code == 200  # the key in use: another remains
        assert_error(admin.get("/v1/keys"), 401, "unauthenticated")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": second["api_key"]}) as admin2:
        assert_error(admin2.delete(f"/v1/keys/{second['key_id']}"), 400, "invalid_request")
        assert admin2.delete(f"/v1/keys/{ops_admin}").status_code == 200  # already revoked: idempotent
    assert _active_admins(ctx) == [second["key_id"]]


def test_two_admins_revoking_each_other_leave_one(server, keys, ctx):
    """Issue 11, item 7: the last-admin rule holds under concurrency (the active admin keys are locked
    while counted), so two admins revoking each other at once never leave the deployment without one."""
    [ops_admin] = _ops_admin(ctx, keys)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        second = _create(admin, "ops", "admin")
    pairs = [(keys.admin, second["key_id"]), (second["api_key"], ops_admin)]
    results: list[int] = []
    barrier = threading.Barrier(2)

    def revoke(key: str, target: str) -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60) as c:
            barrier.wait()
            results.append(c.delete(f"/v1/keys/{target}").status_code)

    threads = [threading.Thread(target=revoke, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_active_admins(ctx)) == 1
    assert sorted(results)[0] == 200 and sorted(results)[1] in (400, 401)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_revocation_rules_through_the_cli(server, keys, ctx):
    """Issue 11, item 7: the CLI's `keys revoke` meets the same rules (one place in the core)."""
    runner = CliRunner()
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        acme_admin = _create(admin, "acme", "admin")
        acme_reader = _create(admin, "acme", "reader")

    def revoke(key: str, key_id: str):  # type: ignore[no-untyped-def]
        env = {"WEIGHTSTORE_URL": server.url, "WEIGHTSTORE_API_KEY": key}
        return runner.invoke(cli_app, ["keys", "revoke", key_id, "-y"], env=env)

    res = revoke(keys.trainer, acme_admin["key_id"])
    assert res.exit_code == 1 and "error [forbidden]" in res.output
    res = revoke(keys.reader, acme_reader["key_id"])
    assert res.exit_code == 1 and "error [forbidden]" in res.output
    res = revoke(keys.trainer, acme_reader["key_id"])
    assert res.exit_code == 0, res.output
    assert f"revoked {acme_reader['key_id']}" in res.output
    res = revoke(acme_admin["api_key"], acme_admin["key_id"])  # the ops admin key remains
    assert res.exit_code == 0, res.output
    [ops_admin] = _ops_admin(ctx, keys)
    res = revoke(keys.admin, ops_admin)
    assert res.exit_code == 1 and "error [invalid_request]" in res.output and "last active admin key" in res.output
    assert _active_admins(ctx) == [ops_admin]
