"""Collector scenarios on SQLite and PostgreSQL against a real S3 store. Each ends with verify()."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.collector._util import assert_verified, delete, download, new_run, object_exists, principal, save
from tests.helpers import sampler_files
from weightstore.db import session_scope
from weightstore.errors import InvalidRequest, LeaseHeld, LeaseLost, NotFound
from weightstore.models import Blob, BlobState, Checkpoint, GcRun, Lease, UsageEvent
from weightstore.objectstore import blob_key
from weightstore.retention import restore_checkpoint
from weightstore_gc import lease, run, verify

HOUR = 3600


def _grace(ctx) -> int:  # type: ignore[no-untyped-def]
    return ctx.settings.gc_grace_seconds


def test_expire_then_sweep_reclaims_only_unreferenced(ctx, keys, clock):
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    a, b = sampler_files(1), sampler_files(2)  # share adapter_config.json (dedup)
    pa = save(ctx, p, run_id, "a", a, ttl=HOUR)
    pb = save(ctx, p, run_id, "b", b)
    clock.advance(HOUR + 1)
    with pytest.raises(NotFound):  # invisible at once, before any collector run
        download(ctx, p, pa)
    rep = run(ctx)
    assert rep.state == "finished" and rep.stats["expire"]["expired"] == 1
    assert rep.stats["sweep"]["deleted_objects"] == 0  # restorable: bytes kept
    assert object_exists(ctx, a["adapter_model.safetensors"])
    with session_scope(ctx.engine) as s:
        ckpt = s.exec(sa.select(Checkpoint).where(Checkpoint.name == "a")).scalar_one()  # type: ignore[call-overload]
        assert ckpt.state == "expired"
        end = s.exec(
            sa.select(UsageEvent).where(
                UsageEvent.checkpoint_id == ckpt.id,  # type: ignore[call-overload]
                UsageEvent.event == "end",
            )
        ).scalar_one()
        assert end.at == ckpt.expires_at  # billed until expires_at, not until the collector noticed
    clock.advance(_grace(ctx) + 1)
    rep = run(ctx)
    assert rep.stats["expire"]["released"] == 1
    assert rep.stats["sweep"]["deleted_objects"] == 1
    assert not object_exists(ctx, a["adapter_model.safetensors"])
    assert object_exists(ctx, a["adapter_config.json"])  # still referenced by b
    assert download(ctx, p, pb) == b
    assert_verified(ctx, collected=True)


def test_dry_run_plans_and_changes_nothing(ctx, keys, clock):
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(3)
    path = save(ctx, p, run_id, "x", files)
    delete(ctx, p, path)
    clock.advance(_grace(ctx) + 1)
    rep = run(ctx, dry_run=True)
    assert rep.plan["sweep"]["candidates"] == 2
    assert rep.plan["sweep"]["candidate_bytes"] == sum(len(v) for v in files.values())
    assert all(object_exists(ctx, v) for v in files.values())
    with session_scope(ctx.engine) as s:
        assert s.exec(sa.select(sa.func.count()).select_from(Blob).where(Blob.state == "live")).scalar_one() == 2  # type: ignore[call-overload]
        assert s.get(GcRun, rep.run_id).dry_run  # type: ignore[union-attr]
    rep = run(ctx)
    assert rep.stats["sweep"]["deleted_objects"] == 2
    assert not any(object_exists(ctx, v) for v in files.values())
    assert_verified(ctx, collected=True)


def test_restore_until_released(ctx, keys, clock):
    p, admin = principal(ctx, keys.trainer), principal(ctx, keys.admin)
    run_id = new_run(ctx, p)
    files = sampler_files(4)
    path = save(ctx, p, run_id, "r", files, ttl=HOUR)
    clock.advance(HOUR + 1)
    run(ctx)
    with session_scope(ctx.engine) as s:
        cid = s.exec(sa.select(Checkpoint.id).where(Checkpoint.name == "r")).scalar_one()  # type: ignore[call-overload]
        restore_checkpoint(s, admin, cid, settings=ctx.settings, now=clock.now())
    assert download(ctx, p, path) == files
    assert_verified(ctx)
    with session_scope(ctx.engine) as s:  # expire again, then let the restore window pass
        s.execute(sa.update(Checkpoint).where(Checkpoint.id == cid).values(expires_at=clock.now()))  # type: ignore[arg-type]
    clock.advance(1)
    run(ctx)
    clock.advance(_grace(ctx) + 1)
    run(ctx)
    with session_scope(ctx.engine) as s, pytest.raises(InvalidRequest):
        restore_checkpoint(s, admin, cid, settings=ctx.settings, now=clock.now())
    assert not object_exists(ctx, files["adapter_model.safetensors"])
    assert_verified(ctx, collected=True)


def test_lease_one_collector_at_a_time(ctx, keys, clock):
    held = lease.acquire(ctx.engine, clock, ttl_seconds=60, owner="other-host:1:x")
    with pytest.raises(LeaseHeld):
        run(ctx)
    assert run(ctx, dry_run=True).state == "finished"  # planning needs no lease
    clock.advance(61)  # the holder stopped heartbeating: the lease is free again
    mine = lease.acquire(ctx.engine, clock, ttl_seconds=60)
    assert mine.token == held.token + 1
    with pytest.raises(LeaseLost):
        held.check()  # the old holder is fenced off
    mine.check()
    mine.release()
    assert run(ctx).state == "finished"
    assert_verified(ctx)


def test_lease_lost_mid_run_aborts_before_deleting(ctx, keys, clock, monkeypatch):
    p = principal(ctx, keys.trainer)
    files = sampler_files(5)
    path = save(ctx, p, new_run(ctx, p), "l", files)
    delete(ctx, p, path)
    clock.advance(_grace(ctx) + 1)
    from weightstore_gc import phases

    real = phases._tombstone

    def steal_then_tombstone(c, shas):  # type: ignore[no-untyped-def]
        with session_scope(ctx.engine) as s:  # another collector takes over (e.g. after a long GC pause)
            s.execute(sa.update(Lease).values(owner="thief", token=Lease.token + 1))  # type: ignore[operator]
        c.check_lease()
        return real(c, shas)

    monkeypatch.setattr(phases, "_tombstone", steal_then_tombstone)
    with pytest.raises(LeaseLost):
        run(ctx)
    assert all(object_exists(ctx, v) for v in files.values())
    with session_scope(ctx.engine) as s:
        assert s.exec(sa.select(GcRun.state).order_by(GcRun.started_at.desc())).first()[0] == "aborted"  # type: ignore[call-overload,attr-defined,index]
    assert_verified(ctx)


@pytest.mark.parametrize("fault", ["partial", "raise"])
def test_s3_errors_during_sweep_keep_rows_for_surviving_objects(ctx, keys, clock, monkeypatch, fault):
    ctx.settings = ctx.settings.model_copy(update={"gc_delete_batch": 2})
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    keep = sampler_files(10)
    pk = save(ctx, p, run_id, "keep", keep)
    doomed = [sampler_files(20 + i) for i in range(3)]
    for i, f in enumerate(doomed):
        delete(ctx, p, save(ctx, p, run_id, f"d{i}", f))
    clock.advance(_grace(ctx) + 1)
    real = ctx.store.delete_many
    calls = []

    def faulty(keys_):  # type: ignore[no-untyped-def]
        keys_ = list(keys_)
        calls.append(keys_)
        if fault == "raise" and len(calls) == 1:
            raise ConnectionError("injected: store unreachable")
        if fault == "partial":  # the store deletes the first key, refuses the others
            deleted, _ = real(keys_[:1])
            return deleted, {k: "InternalError: injected" for k in keys_[1:]}
        return real(keys_)

    monkeypatch.setattr(ctx.store, "delete_many", faulty)
    rep = run(ctx)
    assert rep.stats["sweep"]["delete_failures"] > 0
    with session_scope(ctx.engine) as s:
        rows = {b.sha256: b.state for b in s.exec(sa.select(Blob)).scalars()}  # type: ignore[call-overload]
    for f in doomed:  # the invariant: an object that still exists keeps its row
        for data in f.values():
            sha = hashlib.sha256(data).hexdigest()
            if ctx.store.head(blob_key(sha)) is not None:
                assert sha in rows
            if sha not in rows:
                assert ctx.store.head(blob_key(sha)) is None
    assert download(ctx, p, pk) == keep  # nothing referenced was touched (shared config included)
    assert_verified(ctx)
    monkeypatch.setattr(ctx.store, "delete_many", real)
    rep = run(ctx)  # the next run finishes the job
    assert rep.plan["sweep"]["retry_tombstones"] > 0
    assert not any(object_exists(ctx, f["adapter_model.safetensors"]) for f in doomed)
    assert download(ctx, p, pk) == keep
    assert_verified(ctx, collected=True)


def test_missing_referenced_object_stops_the_run(ctx, keys, clock):
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    victim = sampler_files(30)
    save(ctx, p, run_id, "v", victim)
    garbage = sampler_files(31)
    delete(ctx, p, save(ctx, p, run_id, "g", garbage))
    ctx.store.delete(blob_key(hashlib.sha256(victim["adapter_model.safetensors"]).hexdigest()))  # data loss
    clock.advance(_grace(ctx) + 1)
    rep = run(ctx)
    assert rep.state == "stopped"
    assert [f.kind for f in rep.errors] == ["missing_object"]
    assert object_exists(ctx, garbage["adapter_model.safetensors"])  # fail closed: nothing deleted
    assert [f.kind for f in verify(ctx).errors] == ["missing_object"]


def test_orphans_closes_uploads_and_deletes_unowned_objects(ctx, keys, clock):
    from tests.collector._util import declare

    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(40)
    ans = declare(ctx, p, run_id, "abandoned", files)  # declared, bytes sent, never committed
    from tests.collector._util import send

    send(ctx, p, ans, files)
    stray = b"bytes with no catalog row"
    ctx.store.put_bytes(blob_key(hashlib.sha256(stray).hexdigest()), stray)
    clock.advance(ctx.settings.upload_expiry_seconds + 1)
    rep = run(ctx)
    assert rep.stats["orphans"]["closed_uploads"] == 1
    assert rep.stats["orphans"]["deleted_orphans"] == 1  # written long (> grace) ago, no row
    assert not object_exists(ctx, stray)
    assert object_exists(ctx, files["adapter_model.safetensors"])  # grace counts from the close
    clock.advance(_grace(ctx) + 1)
    rep = run(ctx)
    assert rep.stats["sweep"]["deleted_objects"] == 2
    assert rep.stats["orphans"]["deleted_orphans"] == 0  # what sweep deleted is not counted twice
    assert_verified(ctx, collected=True)


def test_blob_state_after_full_collection(ctx, keys, clock):
    p = principal(ctx, keys.trainer)
    path = save(ctx, p, new_run(ctx, p), "keep", sampler_files(50))
    clock.advance(10 * _grace(ctx))
    run(ctx)
    with session_scope(ctx.engine) as s:
        assert {b.state for b in s.exec(sa.select(Blob)).scalars()} == {BlobState.live.value}  # type: ignore[call-overload]
    assert download(ctx, p, path) == sampler_files(50)
    assert_verified(ctx, collected=True)


def _blob_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_reclaim_latency_bytes_gone_at_first_run_past_expires_at_plus_grace(ctx, keys, clock):
    """The restore window and the blob grace are one window counted from ``expires_at``: on the
    default schedule (a run every interval) the bytes go at the first run after
    ``expires_at + grace``, i.e. within interval + grace (+ the pass itself)."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files, keep = sampler_files(80), sampler_files(81)  # share adapter_config.json
    save(ctx, p, run_id, "ttl", files, ttl=HOUR)
    pk = save(ctx, p, run_id, "keep", keep)
    expires_at = clock.now() + timedelta(seconds=HOUR)
    clock.advance(HOUR + ctx.settings.gc_interval_seconds)  # a scheduled run, up to one interval late
    rep = run(ctx)
    assert rep.stats["expire"] == {"expired_by_policy": 0, "expired": 1, "released": 0}
    with session_scope(ctx.engine) as s:  # the grace of its blobs counts from expires_at, not from this run
        blob = s.get(Blob, _blob_sha(files["adapter_model.safetensors"]))
        assert blob is not None and blob.last_referenced_at == expires_at
    clock.advance(_grace(ctx) - ctx.settings.gc_interval_seconds - 1)  # expires_at + grace - 1 s
    rep = run(ctx)
    assert rep.stats["expire"]["released"] == 0 and rep.stats["sweep"]["deleted_objects"] == 0
    assert object_exists(ctx, files["adapter_model.safetensors"])  # still restorable
    clock.advance(2)  # expires_at + grace + 1 s: ONE run releases the checkpoint and deletes its bytes
    rep = run(ctx)
    assert rep.stats["expire"]["released"] == 1
    assert rep.stats["sweep"]["deleted_objects"] == 1
    assert clock.now() - expires_at <= timedelta(seconds=_grace(ctx) + ctx.settings.gc_interval_seconds)
    assert not object_exists(ctx, files["adapter_model.safetensors"])
    assert object_exists(ctx, files["adapter_config.json"])  # shared with a live checkpoint
    assert download(ctx, p, pk) == keep
    assert_verified(ctx, collected=True)


def test_expiry_never_moves_a_later_reference_end_backwards(ctx, keys, clock):
    """A blob whose last reference ended after ``expires_at`` (here: a dedup twin deleted later)
    keeps that later time: its grace is not shortened by the expiry."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(82)
    save(ctx, p, run_id, "ttl", files, ttl=HOUR)
    twin = save(ctx, p, run_id, "twin", files)  # same bytes, deduplicated
    clock.advance(HOUR + 600)
    delete(ctx, p, twin)  # its reference ends 600 s after the other one's expires_at
    deleted_at = clock.now()
    run(ctx)  # expires "ttl"
    with session_scope(ctx.engine) as s:
        assert s.get(Blob, _blob_sha(files["adapter_model.safetensors"])).last_referenced_at == deleted_at  # type: ignore[union-attr]
    clock.advance(_grace(ctx) - 300)  # past expires_at + grace, not past the twin's delete + grace
    rep = run(ctx)
    assert rep.stats["expire"]["released"] == 1 and rep.stats["sweep"]["deleted_objects"] == 0
    assert all(object_exists(ctx, v) for v in files.values())
    assert_verified(ctx)
    clock.advance(301)
    rep = run(ctx)
    assert rep.stats["sweep"]["deleted_objects"] == 2
    assert not any(object_exists(ctx, v) for v in files.values())
    assert_verified(ctx, collected=True)


def test_collector_down_past_grace_expires_releases_and_sweeps_in_one_run(ctx, keys, clock):
    p = principal(ctx, keys.trainer)
    files = sampler_files(83)
    save(ctx, p, new_run(ctx, p), "late", files, ttl=HOUR)
    clock.advance(HOUR + _grace(ctx) + 1)  # no collector ran meanwhile
    rep = run(ctx)
    assert rep.stats["expire"] == {"expired_by_policy": 0, "expired": 1, "released": 1}
    assert rep.stats["sweep"]["deleted_objects"] == 2
    with session_scope(ctx.engine) as s:
        ckpt = s.exec(sa.select(Checkpoint).where(Checkpoint.name == "late")).scalar_one()  # type: ignore[call-overload]
        end = s.exec(
            sa.select(UsageEvent).where(
                UsageEvent.checkpoint_id == ckpt.id,  # type: ignore[call-overload]
                UsageEvent.event == "end",
            )
        ).scalar_one()
        assert ckpt.state == "deleted" and end.at == ckpt.expires_at
    assert not any(object_exists(ctx, v) for v in files.values())
    assert_verified(ctx, collected=True)
