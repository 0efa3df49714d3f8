"""The trash bin and restore by tinker path (issue 12, part 4), through a live server.

A checkpoint is restorable from the moment its ``expires_at`` passes, before or after the
collector's expire phase, until the collector releases it; foreign paths answer like missing ones.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlmodel import col, select
from typer.testing import CliRunner

from tests.collector._util import assert_verified, download, new_run, principal, save
from tests.helpers import sampler_files
from weightstore import runs
from weightstore.db import session_scope
from weightstore.models import Checkpoint, UsageEvent, UsageInterval

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _ledger(ctx, path: str) -> tuple[list[tuple[str, object]], UsageInterval]:  # type: ignore[no-untyped-def]
    run_id, _, name = path.removeprefix("tinker://").split("/")
    with session_scope(ctx.engine) as s:
        cid = s.exec(select(Checkpoint.id).where(Checkpoint.run_id == run_id, Checkpoint.name == name)).one()
        events = [
            (e.event, e.at)
            for e in s.exec(select(UsageEvent).where(UsageEvent.checkpoint_id == cid).order_by(col(UsageEvent.id)))
        ]
        interval = s.get(UsageInterval, cid)
        assert interval is not None
        s.expunge(interval)
    return events, interval


def _clients(server, keys):  # type: ignore[no-untyped-def]
    h = {"timeout": 60, "base_url": server.url}
    return (
        httpx.Client(headers={"X-API-Key": keys.trainer}, **h),
        httpx.Client(headers={"X-API-Key": keys.admin}, **h),
        httpx.Client(headers={"X-API-Key": keys.other_trainer}, **h),
        httpx.Client(headers={"X-API-Key": keys.reader}, **h),
    )


def test_restore_in_the_window_before_the_collector_runs(server, keys, ctx, clock, db_url):
    """issue 12, part 4 (and the Found bullet): past ``expires_at`` but before any collector run the
    checkpoint answers 404, is listed in the trash with honest bounds, restores by path, reads back
    byte-identical, and the ledger reads exactly as if the expire phase had run first (end at
    ``expires_at``, restore cancels it: billed from commit to the new expiry without a gap)."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(7)
    committed_at = clock.now()
    path = save(ctx, p, run_id, "x", files, ttl=3600)
    expires_at = committed_at + timedelta(seconds=3600)
    trainer, admin, other, reader = _clients(server, keys)
    with trainer, admin, other, reader:
        assert trainer.get("/v1/trash").json() == {"checkpoints": []}  # not expired yet
        r = trainer.post("/v1/trash/restore", json={"path": path, "ttl_seconds": 7200})
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        clock.advance(3601)
        assert trainer.get(f"/v1/checkpoints/{path.removeprefix('tinker://')}").status_code == 404
        [entry] = trainer.get("/v1/trash").json()["checkpoints"]
        grace, interval = ctx.settings.gc_grace_seconds, ctx.settings.gc_interval_seconds
        assert entry["tinker_path"] == path and entry["size_bytes"] == sum(len(v) for v in files.values())
        assert _parse(entry["expired_at"]) == expires_at
        assert _parse(entry["restorable_until"]) == _parse(entry["expired_at"]) + timedelta(seconds=grace)
        assert _parse(entry["collected_by"]) == _parse(entry["expired_at"]) + timedelta(seconds=grace + interval)
        # foreign tenant: the same answer as a path nobody holds; its trash is empty; readers cannot restore
        r = other.post("/v1/trash/restore", json={"path": path, "ttl_seconds": 7200})
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        missing = other.post("/v1/trash/restore", json={"path": path.replace("/x", "/nobody"), "ttl_seconds": 7200})
        assert r.json()["message"].replace(path, "P") == missing.json()["message"].replace(path.replace("/x", "/nobody"), "P")
        assert other.get("/v1/trash").json() == {"checkpoints": []}
        assert reader.post("/v1/trash/restore", json={"path": path}).status_code == 403
        r = trainer.post("/v1/trash/restore", json={"path": path, "ttl_seconds": 5})
        assert (r.status_code, r.json()["code"]) == (400, "invalid_ttl")

        restored_at = clock.now()
        r = trainer.post("/v1/trash/restore", json={"path": path, "ttl_seconds": 7200})
        assert r.status_code == 200, r.text
        assert _parse(r.json()["expires_at"]) == restored_at + timedelta(seconds=7200)
        assert trainer.get("/v1/trash").json() == {"checkpoints": []}
        assert download(ctx, p, path) == files
        events, iv = _ledger(ctx, path)
        assert events == [("commit", committed_at), ("end", expires_at), ("restore", restored_at)]
        assert (iv.start_s, iv.stop_s) == (
            int(committed_at.timestamp()),
            int((restored_at + timedelta(seconds=7200)).timestamp()),
        )
        # the collector leaves it alone now
        r = admin.post("/v1/admin/gc/runs", json={})
        stats = r.json()["stats"]["expire"]
        assert (stats["expired"], stats["released"]) == (0, 0)
    assert download(ctx, p, path) == files
    assert_verified(ctx)


def test_restore_after_the_expire_phase_and_refusal_after_collection(server, keys, ctx, clock, db_url):
    """issue 12, part 4: after the expire phase the checkpoint is still in the trash and restores
    (same ledger as before the phase); once the collector released it (grace after expiry) the trash
    no longer lists it, restore answers not_found, and the bytes are gone."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    a, b = sampler_files(11), sampler_files(12)
    t0 = clock.now()
    pa = save(ctx, p, run_id, "a", a, ttl=3600)
    pb = save(ctx, p, run_id, "b", b, ttl=3600)
    trainer, admin, other, reader = _clients(server, keys)
    with trainer, admin, other, reader:
        clock.advance(3601)
        r = admin.post("/v1/admin/gc/runs", json={"phases": ["expire"]})
        stats = r.json()["stats"]["expire"]
        assert (stats["expired"], stats["released"]) == (2, 0)
        assert sorted(e["tinker_path"] for e in trainer.get("/v1/trash").json()["checkpoints"]) == sorted([pa, pb])
        restored_at = clock.now()
        r = trainer.post("/v1/trash/restore", json={"path": pa})
        assert r.status_code == 200 and r.json()["expires_at"] is None
        events, iv = _ledger(ctx, pa)
        assert events == [("commit", t0), ("end", t0 + timedelta(seconds=3600)), ("restore", restored_at)]
        assert iv.stop_s == 2**62  # open-ended: no expiry any more, no gap

        clock.advance(ctx.settings.gc_grace_seconds + 1)
        r = admin.post("/v1/admin/gc/runs", json={})
        assert r.json()["stats"]["expire"]["released"] == 1
        assert trainer.get("/v1/trash").json() == {"checkpoints": []}
        r = trainer.post("/v1/trash/restore", json={"path": pb})
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        # the admin route by id refuses the released checkpoint too
        with session_scope(ctx.engine) as s:
            cid = s.exec(select(Checkpoint.id).where(Checkpoint.name == "b")).one()
        r = admin.post(f"/v1/admin/checkpoints/{cid}/restore", json={})
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    assert download(ctx, p, pa) == a
    assert_verified(ctx, collected=True)


def test_trash_ls_and_restore_commands(server, keys, ctx, clock, db_url):
    """issue 12, part 4: ``weightstore trash ls`` prints tinker path, expired at, restorable until;
    ``weightstore restore PATH --ttl S`` brings it back."""
    from weightstore_cli import app

    p = principal(ctx, keys.trainer)
    with session_scope(ctx.engine) as s:
        run_id = runs.create_run(s, p, base_model="tiny", now=clock.now(), run_id="r1").id  # a short path fits the table
    path = save(ctx, p, run_id, "old", sampler_files(3), ttl=3600)
    expires_at = clock.now() + timedelta(seconds=3600)
    clock.advance(3601)
    runner = CliRunner()
    auth = ["--url", server.url, "--api-key", keys.trainer]
    res = runner.invoke(app, ["trash", "ls", *auth])
    assert res.exit_code == 0, res.output
    header, row = res.stdout.strip().splitlines()[:2]
    assert header.split()[:3] == ["TINKER_PATH", "EXPIRED_AT", "RESTORABLE_UNTIL"]
    until = expires_at + timedelta(seconds=ctx.settings.gc_grace_seconds)
    assert path in row
    assert expires_at.strftime("%Y-%m-%d %H:%M UTC") in row and until.strftime("%Y-%m-%d %H:%M UTC") in row
    res = runner.invoke(app, ["restore", path, "--ttl", "7200", *auth])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == path
    res = runner.invoke(app, ["trash", "ls", *auth])
    assert res.exit_code == 0 and path not in res.stdout
    res = runner.invoke(app, ["restore", path, *auth])
    assert res.exit_code == 1 and "not in the trash" in res.output


def test_admin_tenant_page_lists_the_trash(server, keys, ctx, clock, db_url):
    """issue 12, part 4: the tenant's admin page has a Trash card listing restorable checkpoints."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    path = save(ctx, p, run_id, "gone", sampler_files(4), ttl=3600)
    clock.advance(3601)
    from tests.security.test_keys_and_sessions import sign_in, ui_client

    with ui_client(server) as ui:
        assert sign_in(ui, keys.admin).status_code == 303
        html = ui.get("/admin/tenants/acme").text
    trash = html[html.index("<h2>Trash</h2>") :]
    trash = trash[: trash.index("</section>")]
    assert path in trash


def _parse(iso: str):  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00"))
