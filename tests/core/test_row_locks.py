"""Row locks never deadlock with the foreign-key locks of inserts (CI, stop 17: a Tinker copy and two
restores of one tenant at once; one of them got 503 ``catalog_busy`` from a PostgreSQL deadlock).

The class: PostgreSQL takes ``FOR KEY SHARE`` on a parent row whenever a transaction inserts a child
row that references it (a run or checkpoint of a tenant, a checkpoint of a run, a file of an upload).
A writer lock taken with plain ``FOR UPDATE`` conflicts with that, so a transaction that had inserted
a child and then waited on some other row (a blob) formed a cycle with one that held that row and
asked for the parent's lock (the quota's tenant lock). Every writer lock now goes through
``db.for_write`` (``FOR NO KEY UPDATE``: writer locks still exclude each other, child inserts pass),
and rows of one table are locked in key order. Tested three ways: the source has no other row lock
(every member of the class goes through the one helper), a parent lock is granted at once beside an
uncommitted child insert (tenant, run, upload), and the exact interleaving CI hit commits both sides.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from tests.collector._util import new_run, principal, save
from tests.helpers import lock_waiters, sampler_files
from weightstore import blobs, runs, tenants
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import WRITE_LOCK, session_scope
from weightstore.models import Checkpoint, CheckpointFile, Upload, UploadFile
from weightstore.names import TinkerPath, new_id

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["weightstore", "api", "gc", "cli"]

# The one row lock that stays plain FOR UPDATE, and why (it may delete the rows it locks).
PLAIN_FOR_UPDATE = {"weightstore/blobs/__init__.py": 1}


def test_every_row_lock_goes_through_db_for_write() -> None:
    """Any ``with_for_update`` outside ``weightstore/db.py`` is a new member of the class: it must use
    ``db.for_write`` / ``db.WRITE_LOCK`` or be listed above with its reason."""
    found: dict[str, int] = {}
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "weightstore/db.py":
                continue
            text = path.read_text()
            n = len(re.findall(r"with_for_update\s*\(", text)) + len(re.findall(r"with_for_update\s*=\s*(?!WRITE_LOCK)", text))
            if n:
                found[rel] = n
    assert found == PLAIN_FOR_UPDATE


def _postgresql_only(ctx: Context) -> None:
    if ctx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE: there are no row locks")


def _granted_beside(ctx: Context, insert_child: Callable[[Session], None], take_lock: Callable[[Session], None]) -> None:
    """``take_lock`` in one transaction while another holds an uncommitted child insert: granted at
    once (a 2 s lock timeout would raise ``catalog_busy`` if it waited)."""
    with session_scope(ctx.engine) as child:
        insert_child(child)
        child.flush()
        with session_scope(ctx.engine) as locker:
            locker.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            take_lock(locker)
        child.rollback()


def _run_of(ctx: Context, who: Principal) -> str:
    return new_run(ctx, who)


def test_tenant_quota_lock_beside_an_uncommitted_run_of_the_tenant(ctx, keys) -> None:  # type: ignore[no-untyped-def]
    _postgresql_only(ctx)
    acme = principal(ctx, keys.trainer)
    now = ctx.clock.now()
    _granted_beside(
        ctx,
        lambda s: runs.create_run(s, acme, base_model="m", now=now) and None,
        lambda s: tenants.check_quota(s, acme.tenant_id, 1, now=now, lock=True),
    )


def test_run_lock_beside_an_uncommitted_checkpoint_of_the_run(ctx, keys) -> None:  # type: ignore[no-untyped-def]
    _postgresql_only(ctx)
    acme = principal(ctx, keys.trainer)
    run_id, now = _run_of(ctx, acme), ctx.clock.now()
    child = Checkpoint(
        id=new_id("ckpt"), tenant_id=acme.tenant_id, run_id=run_id, kind="sampler_weights", name="x", size_bytes=0, created_at=now
    )
    _granted_beside(ctx, lambda s: s.add(child), lambda s: runs.lock_for_write(s, acme.tenant_id, run_id) and None)


def test_upload_lock_beside_an_uncommitted_file_of_the_upload(ctx, keys) -> None:  # type: ignore[no-untyped-def]
    _postgresql_only(ctx)
    acme = principal(ctx, keys.trainer)
    run_id, now = _run_of(ctx, acme), ctx.clock.now()
    source = save(ctx, acme, run_id, "src", sampler_files(1))
    with session_scope(ctx.engine) as s:
        p = TinkerPath.parse(source)
        ckpt = s.exec(select(Checkpoint).where(Checkpoint.run_id == p.run_id, Checkpoint.name == p.name)).one()
        sha = s.exec(select(CheckpointFile.sha256).where(CheckpointFile.checkpoint_id == ckpt.id)).first()
        upload = Upload(
            id=new_id("upl"),
            tenant_id=acme.tenant_id,
            run_id=run_id,
            kind="sampler_weights",
            name="u",
            created_at=now,
            expires_at=now + timedelta(hours=1),
        )
        s.add(upload)
    assert sha is not None
    _granted_beside(
        ctx,
        lambda s: s.add(UploadFile(upload_id=upload.id, path="a.bin", size_bytes=1, sha256=sha, transfer="present")),
        lambda s: s.get(Upload, upload.id, with_for_update=WRITE_LOCK) and None,
    )


def _wait_until_blocked(ctx: Context, timeout: float = 20.0) -> None:
    """Until some other backend of this database waits on a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock_waiters(ctx.engine):
            return
        time.sleep(0.05)
    raise AssertionError("the copy-like transaction never waited on the blob lock")


def test_the_interleaving_ci_hit_commits_both_sides(ctx, keys) -> None:  # type: ignore[no-untyped-def]
    """A (a copy): inserts a run of the tenant, then waits for a blob row. B (a restore): holds that
    blob row, then takes the tenant's quota lock. Before the fix B waited on A's key-share lock and
    PostgreSQL aborted one of them as a deadlock; now B commits, then A."""
    _postgresql_only(ctx)
    acme = principal(ctx, keys.trainer)
    source = save(ctx, acme, _run_of(ctx, acme), "src", sampler_files(2))
    with session_scope(ctx.engine) as s:
        p = TinkerPath.parse(source)
        ckpt = s.exec(select(Checkpoint).where(Checkpoint.run_id == p.run_id, Checkpoint.name == p.name)).one()
        shas = list(s.exec(select(CheckpointFile.sha256).where(CheckpointFile.checkpoint_id == ckpt.id)))
    now = ctx.clock.now()
    b_holds_blobs, errors = threading.Event(), []

    def a_copy() -> None:
        try:
            with session_scope(ctx.engine) as s:
                b_holds_blobs.wait(10)
                runs.create_run(s, acme, base_model="m", now=now)
                s.flush()  # FOR KEY SHARE on the tenant row
                blobs.lock_live(s, shas)  # waits for B
                tenants.check_quota(s, acme.tenant_id, 1, now=now, lock=True)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=a_copy)
    thread.start()
    try:
        with session_scope(ctx.engine) as s:
            blobs.lock_live(s, shas)
            b_holds_blobs.set()
            _wait_until_blocked(ctx)
            tenants.check_quota(s, acme.tenant_id, 1, now=now, lock=True)
    finally:
        b_holds_blobs.set()
        thread.join(60)
    assert errors == []
