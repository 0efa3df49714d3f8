"""Dedup against a blob while the collector sweeps it: the save either re-sends the bytes or the
blob survives; a committed checkpoint never points at a deleted object."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from tests.collector._util import assert_verified, declare, delete, download, new_run, principal, save, send
from tests.helpers import sampler_files
from weightstore import uploads
from weightstore.db import session_scope
from weightstore.errors import CatalogBusy, UploadIncomplete
from weightstore.models import Blob
from weightstore_gc import run


def _garbage(ctx, keys, clock, seed):  # type: ignore[no-untyped-def]
    """A tenant's checkpoint deleted longer than grace ago: its blobs are sweep candidates."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(seed)
    delete(ctx, p, save(ctx, p, run_id, "old", files))
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    return p, run_id, files


def test_declared_dedup_protects_blob_from_sweep(ctx, keys, clock):
    p, run_id, files = _garbage(ctx, keys, clock, 60)
    ans = declare(ctx, p, run_id, "new", files)
    assert {f.transfer for f in ans.files} == {"present"}  # zero bytes move
    rep = run(ctx)
    assert rep.stats["sweep"]["deleted_objects"] == 0
    uploads.commit(ctx, p, ans.upload_id)
    assert download(ctx, p, f"tinker://{run_id}/sampler_weights/new") == files
    assert_verified(ctx)


def test_save_during_tombstone_must_resend(ctx, keys, clock, monkeypatch):
    p, run_id, files = _garbage(ctx, keys, clock, 61)
    real = ctx.store.delete_many
    seen = {}

    def delete_while_saving(keys_):  # type: ignore[no-untyped-def]
        # The blobs are tombstoned (committed) but not yet deleted: a save arrives right now.
        ans = declare(ctx, p, run_id, "new", files)
        seen["transfers"] = {f.transfer for f in ans.files}
        with pytest.raises(CatalogBusy):
            send(ctx, p, ans, files)
        seen["upload"] = ans
        return real(keys_)

    monkeypatch.setattr(ctx.store, "delete_many", delete_while_saving)
    rep = run(ctx)
    monkeypatch.setattr(ctx.store, "delete_many", real)
    assert seen["transfers"] == {"stream"}  # no dedup answer for bytes being collected
    assert rep.stats["sweep"]["deleted_objects"] == 2
    send(ctx, p, seen["upload"], files)  # the retry re-uploads
    uploads.commit(ctx, p, seen["upload"].upload_id)
    assert download(ctx, p, f"tinker://{run_id}/sampler_weights/new") == files
    assert_verified(ctx)


def test_commit_rechecks_blob_liveness(ctx, keys, clock):
    p, run_id, files = _garbage(ctx, keys, clock, 62)
    ans = declare(ctx, p, run_id, "new", files)
    with session_scope(ctx.engine) as s:  # a tombstone that slipped in between declare and commit
        s.execute(sa.update(Blob).values(state="deleting"))
    with pytest.raises(UploadIncomplete) as exc:
        uploads.commit(ctx, p, ans.upload_id)
    assert sorted(exc.value.details["files"]) == sorted(files)
    run(ctx)  # finishes the delete
    for path in exc.value.details["files"]:  # the client re-sends what the error names
        uploads.receive_bytes(ctx, p, ans.upload_id, path, files[path])
    uploads.commit(ctx, p, ans.upload_id)
    assert download(ctx, p, f"tinker://{run_id}/sampler_weights/new") == files
    assert_verified(ctx)


def test_concurrent_saves_and_sweeps(ctx, keys, clock):
    p, run_id, files = _garbage(ctx, keys, clock, 63)
    stop = threading.Event()
    errors: list[BaseException] = []

    def collector() -> None:
        while not stop.is_set():
            try:
                run(ctx, ["sweep"])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    t = threading.Thread(target=collector)
    t.start()
    committed = []
    try:
        for i in range(4):
            ans = declare(ctx, p, run_id, f"n{i}", files)
            resend = [f.path for f in ans.files if f.transfer == "stream"]
            for _ in range(50):
                try:
                    for path in resend:
                        uploads.receive_bytes(ctx, p, ans.upload_id, path, files[path])
                    resend = []
                    committed.append(uploads.commit(ctx, p, ans.upload_id).tinker_path)
                    break
                except CatalogBusy:  # bytes being deleted right now: retry shortly, as a client would
                    time.sleep(0.05)
                except UploadIncomplete as exc:  # the dedup target was collected: send the bytes
                    resend = list(exc.details["files"])
            assert download(ctx, p, committed[-1]) == files
            delete(ctx, p, committed[-1])
            clock.advance(ctx.settings.gc_grace_seconds + 1)
        last = save(ctx, p, run_id, "last", files)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert download(ctx, p, last) == files
    assert_verified(ctx)


def test_declare_rechecks_reused_blobs_collected_between_its_transactions(ctx, keys, clock, monkeypatch):
    """The declare reads what it may reuse in one transaction and records the upload in a second
    (presigning in between is network I/O). A collector pass that tombstones and deletes a reused
    blob in that gap must not leave a "present" answer the commit then refuses: the declare
    answers again and asks for the bytes (found by CI under load, after the one-house refactor)."""
    p, run_id, files = _garbage(ctx, keys, clock, 64)
    real = uploads._answer_files
    passes = []

    def collect_in_the_gap(*args, **kwargs):  # type: ignore[no-untyped-def]
        answered = real(*args, **kwargs)
        if not passes:
            passes.append(run(ctx))  # expire, mark, sweep: the unreferenced blobs go now
        return answered

    monkeypatch.setattr(uploads, "_answer_files", collect_in_the_gap)
    ans = declare(ctx, p, run_id, "new", files)
    monkeypatch.setattr(uploads, "_answer_files", real)
    assert passes[0].stats["sweep"]["deleted_objects"] == 2
    assert {f.transfer for f in ans.files} == {"stream"}  # not "present": those bytes are gone
    send(ctx, p, ans, files)
    path = uploads.commit(ctx, p, ans.upload_id).tinker_path
    assert download(ctx, p, path) == files
    assert_verified(ctx)
